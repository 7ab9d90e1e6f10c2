//! Failure scenarios against the real kube-apiserver, with faults injected by the proxy in
//! `test_support::apiproxy`: watches that go down and come back with `410 Gone`, forced
//! conflicts and throttling on writes, an outage of one kind's API, a silent (half-open) watch
//! (`silent`); and faults of the cluster's own making: hand-edited slices and a slice held by a
//! finalizer (`edits`), changes made while no replica leads (`leaderless`; LoadBalancer class
//! changes with our cloud-lb controller and a local pool in `classes`), the leader killed
//! in the middle of a mass create (`failover`). Our controllers talk to the API server only
//! through the proxy (the failover scenario runs two manager processes instead);
//! kube-controller-manager's EndpointSlice controller runs beside them directly, and at the end
//! of each scenario the invariants in `test_support::invariants` must hold: our slices equal
//! upstream's, nothing allocated twice, no panic. Each scenario adds a row to the report
//! `make chaos` prints (`SCM_CHAOS_REPORT`); the long ones are `#[ignore]`d and run there.

// The crate root is tests/faults.rs, so its modules name their files under tests/faults/.
#[path = "faults/classes.rs"]
mod classes;
#[path = "faults/edits.rs"]
mod edits;
#[path = "faults/failover.rs"]
mod failover;
#[path = "faults/leaderless.rs"]
mod leaderless;
#[path = "faults/scene.rs"]
mod scene;
#[path = "faults/silent.rs"]
mod silent;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use reqwest::Method;
use scm_runtime::{Change, Informers};
use test_support::apiproxy::{Action, ApiProxy, Match};
use test_support::inprocess::InProcess;
use test_support::{
    ControlPlane, NodeSpecBuilder, PodBuilder, create_node, create_pod, namespace, set_pod_status,
    wait_for,
};
use tokio_util::sync::CancellationToken;

use scene::{Scene, WAIT, scoped, service, while_watch_down};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relist_after_410_delivers_deletions_missed_while_the_watch_was_down() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let admin = cp.client().await?;
    let proxy = ApiProxy::start(admin.clone()).await?;
    let ns = namespace(&admin, "faults-informer").await?;
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    for name in ["kept", "gone"] {
        svcs.create(&PostParams::default(), &service(&ns, name, None))
            .await?;
    }
    let stop = CancellationToken::new();
    let informers = Informers::new(kube::Client::try_from(proxy.config()?)?, stop.clone());
    let index: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let relists = Arc::new(Mutex::new(0u32));
    let (i, r, my_ns) = (index.clone(), relists.clone(), ns.clone());
    let name = move |s: &Service| -> Option<String> {
        (s.metadata.namespace.as_deref() == Some(my_ns.as_str()))
            .then(|| s.metadata.name.clone().unwrap_or_default())
    };
    informers.services().subscribe(move |c| {
        let mut idx = i.lock().unwrap_or_else(|e| e.into_inner());
        match c {
            Change::Apply(s) => idx.extend(name(s)),
            Change::Delete(s) => {
                if let Some(n) = name(s) {
                    idx.remove(&n);
                }
            }
            Change::Relisted(all) => {
                *r.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                *idx = all.iter().filter_map(|s| name(s)).collect();
            }
        }
    });
    let names = || index.lock().unwrap_or_else(|e| e.into_inner()).clone();
    wait_for("both Services seen", WAIT, || async {
        (names().len() == 2).then_some(())
    })
    .await?;
    test_support::invariants::count_panics();
    let started = std::time::Instant::now();
    while_watch_down(&proxy, "services", || async {
        svcs.delete("gone", &DeleteParams::default()).await?;
        Ok(())
    })
    .await?;
    wait_for("the deletion delivered by the relist", WAIT, || async {
        (names() == BTreeSet::from(["kept".to_string()])).then_some(())
    })
    .await?;
    quiet_row(
        &admin,
        "Services watch down, a Service deleted meanwhile, 410 on return (informer)",
        proxy.injected(),
        started,
    )
    .await?;
    assert!(
        *relists.lock().unwrap_or_else(|e| e.into_inner()) >= 2,
        "the deletion came through a relist, not a watch event"
    );
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slice_deleted_while_the_watch_was_down_is_recreated_after_the_relist() -> Result<()> {
    // Issue 12 defect 1: the generation tracker kept the deleted slice, `stale()` stayed true
    // and that Service never synced again until a restart.
    let _turn = scene::shared_turn().await;
    let cp = ControlPlane::shared().await?;
    let admin = cp.client().await?;
    let proxy = ApiProxy::start(admin.clone()).await?;
    let ns = namespace(&admin, "faults-slices").await?;
    create_node(
        &admin,
        NodeSpecBuilder {
            name: format!("{ns}-node"),
            ..Default::default()
        },
    )
    .await?;
    let svcs: Api<Service> = Api::namespaced(admin.clone(), &ns);
    svcs.create(
        &PostParams::default(),
        &service(&ns, "web", Some(("app", "web"))),
    )
    .await?;
    let mut pb = PodBuilder::new(&ns, "web-1", &[("app", "web")]);
    pb.node_name = Some(format!("{ns}-node"));
    create_pod(&admin, &pb).await?;
    set_pod_status(&admin, &ns, "web-1", true, &["10.9.0.1"]).await?;

    let c = InProcess::new(kube::Client::try_from(proxy.config()?)?);
    let cfg = scoped(&ns);
    c.start("endpointslice", "endpoint-slice-controller", |ctx| {
        endpointslice::run(ctx, cfg)
    });
    let slices: Api<EndpointSlice> = Api::namespaced(admin.clone(), &ns);
    let lp = ListParams::default().labels("kubernetes.io/service-name=web");
    let first = wait_for("our slice", WAIT, || async {
        let l = slices.list(&lp).await.ok()?;
        let s = l.items.into_iter().next()?;
        s.endpoints
            .as_ref()
            .is_some_and(|e| !e.is_empty())
            .then_some(s)
    })
    .await?;
    let first_uid = first.metadata.uid.clone();
    test_support::invariants::count_panics();
    let started = std::time::Instant::now();
    while_watch_down(&proxy, "endpointslices", || async {
        let name = first.metadata.name.clone().unwrap_or_default();
        slices.delete(&name, &DeleteParams::default()).await?;
        Ok(())
    })
    .await?;
    wait_for("a new slice for the Service", WAIT, || async {
        let l = slices.list(&lp).await.ok()?;
        l.items
            .iter()
            .any(|s| {
                s.metadata.uid != first_uid && s.endpoints.as_ref().is_some_and(|e| !e.is_empty())
            })
            .then_some(())
    })
    .await?;
    quiet_row(
        &admin,
        "slice watch down, our slice deleted meanwhile, 410 on return (defect 1)",
        proxy.injected(),
        started,
    )
    .await
}

/// The chaos row of a scenario without upstream's slices to compare: double allocations and
/// panics only (its own assertions have passed); fails on either.
async fn quiet_row(
    admin: &kube::Client,
    scenario: &str,
    faults: u64,
    started: std::time::Instant,
) -> Result<()> {
    let doubles = test_support::invariants::double_allocations(admin).await?;
    let panics = test_support::invariants::panics();
    test_support::chaos::report(&test_support::chaos::Row {
        scenario,
        faults,
        converged_in: started.elapsed(),
        slices_differ: None,
        doubles: doubles.len(),
        leaked: None,
        panics,
    });
    assert!(
        doubles.is_empty(),
        "{scenario}: allocated twice: {doubles:?}"
    );
    assert_eq!(panics, 0, "{scenario}: a panic in this process");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_conflicts_on_slice_writes_during_readiness_flaps() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let proxy = ApiProxy::start(cp.client().await?).await?;
    let scene = Scene::start(cp, &proxy, "faults-409", 3, 3).await?;
    let started = std::time::Instant::now();
    let conflict = Action::Status {
        code: 409,
        retry_after: None,
    };
    proxy.fail(
        Match::writes(Method::PUT, "endpointslices"),
        conflict.clone(),
        6,
    );
    proxy.fail(Match::writes(Method::POST, "endpointslices"), conflict, 3);
    scene.flap(3, 3).await?;
    scene
        .finish(
            "409s on slice writes while readiness flaps",
            &proxy,
            started,
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_writes_with_retry_after_converge() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let proxy = ApiProxy::start(cp.client().await?).await?;
    let scene = Scene::start(cp, &proxy, "faults-429", 2, 2).await?;
    // Throttle writes of a running controller, not its first list.
    scene.settled("before the throttling").await?;
    let started = std::time::Instant::now();
    let throttled = Action::Status {
        code: 429,
        retry_after: Some(1),
    };
    proxy.fail(
        Match {
            watch: Some(false),
            ..Match::resource("endpointslices")
        },
        throttled,
        8,
    );
    scene.flap(2, 2).await?;
    scene
        .finish("429 with Retry-After on slice requests", &proxy, started)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_of_the_pod_api_then_recovery_converges() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let proxy = ApiProxy::start(cp.client().await?).await?;
    let scene = Scene::start(cp, &proxy, "faults-outage", 2, 2).await?;
    // Wait for our first slices, so the outage hits a running controller.
    let ours = || async {
        let api: Api<EndpointSlice> = Api::namespaced(scene.admin.clone(), &scene.ns);
        let lp = ListParams::default().labels(&format!(
            "endpointslice.kubernetes.io/managed-by={}",
            test_support::invariants::OURS
        ));
        let n = api.list(&lp).await.ok()?.items.len();
        (n >= scene.services.len()).then_some(())
    };
    wait_for("our first slices", WAIT, ours).await?;
    let started = std::time::Instant::now();
    while_watch_down(&proxy, "pods", || async { scene.flap(2, 3).await }).await?;
    scene
        .finish(
            "pods API down, readiness changed meanwhile, 410 on return",
            &proxy,
            started,
        )
        .await
}

//! Failure scenarios against the real kube-apiserver, with faults injected by the proxy in
//! `test_support::apiproxy`: watches that go down and come back with `410 Gone`, and what the
//! shared informers and the controllers make of the deletions they missed meanwhile.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::core::ObjectMeta;
use scm_runtime::{Change, Informers};
use test_support::apiproxy::{Action, ApiProxy, Match};
use test_support::inprocess::InProcess;
use test_support::{
    ControlPlane, NodeSpecBuilder, PodBuilder, create_node, create_pod, namespace, set_pod_status,
    wait_for,
};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

fn service(ns: &str, name: &str, selector: Option<(&str, &str)>) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: selector.map(|(k, v)| [(k.to_string(), v.to_string())].into()),
            ports: Some(vec![ServicePort {
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Takes the watches of `resource` down (every list and watch answers 503), runs `meanwhile`,
/// then lets them back with a `410 Gone` on the first watch, so the client must relist.
async fn while_watch_down<F, Fut>(proxy: &ApiProxy, resource: &str, meanwhile: F) -> Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let down = Action::Status {
        code: 503,
        retry_after: None,
    };
    proxy.fail(
        Match {
            watch: None,
            ..Match::resource(resource)
        },
        down,
        u32::MAX,
    );
    proxy.end_watches(resource);
    let before = proxy.injected();
    // The client has noticed: at least one of its attempts was refused.
    wait_for("a refused re-watch", WAIT, || async {
        (proxy.injected() > before).then_some(())
    })
    .await?;
    meanwhile().await?;
    proxy.clear_faults();
    proxy.fail(Match::watches(resource), Action::Gone, 1);
    Ok(())
}

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
    while_watch_down(&proxy, "services", || async {
        svcs.delete("gone", &DeleteParams::default()).await?;
        Ok(())
    })
    .await?;
    wait_for("the deletion delivered by the relist", WAIT, || async {
        (names() == BTreeSet::from(["kept".to_string()])).then_some(())
    })
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
    c.start("endpointslice", "endpoint-slice-controller", |ctx| {
        endpointslice::run(ctx, endpointslice::EndpointSliceConfig::default())
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
    Ok(())
}

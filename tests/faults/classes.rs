//! `spec.loadBalancerClass` changes while no replica leads. The class is immutable on a
//! LoadBalancer Service, so a Service changes class by going through another type and back
//! (the API server drops the class and the status with the type). Meanwhile nothing of ours
//! may be written; once leadership returns, the Service that left our class is cleaned up
//! (finalizer removed, its address released) and the one that joined is served, from a pool
//! so small that it can only be served with the released address: nothing is served twice.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, anyhow};
use cloud_lb::local::{LocalCloudConfig, LocalProvider};
use cloud_lb::{CloudLbConfig, ProviderKind};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams, PostParams};
use test_support::invariants::{AddressWatch, double_load_balancer_addresses};
use test_support::{ControlPlane, wait_for};

use crate::scene::{Found, Scene, WAIT, service};
use test_support::apiproxy::ApiProxy;

const FINALIZER: &str = "service.kubernetes.io/load-balancer-cleanup";
const OURS: &str = "faults.scm.test/ours";
const OTHER: &str = "faults.scm.test/other";
/// Two usable addresses (no other scenario uses this pool).
const POOL: &str = "10.203.0.0/30";
const POOL_SIZE: usize = 2;

fn ips(s: &Service) -> Vec<String> {
    s.status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone())
        .collect()
}

fn has_finalizer(s: &Service) -> bool {
    s.metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == FINALIZER)
}

/// A LoadBalancer Service of `class` selecting the scene's first Service's pods.
fn lb(ns: &str, name: &str, class: &str) -> Service {
    let mut s = service(ns, name, Some(("app", "svc-0")));
    if let Some(spec) = s.spec.as_mut() {
        spec.type_ = Some("LoadBalancer".into());
        spec.load_balancer_class = Some(class.into());
    }
    s
}

/// Moves a LoadBalancer Service to `class` the only way the API server allows: through
/// ClusterIP (which drops the class) and back.
async fn change_class(api: &Api<Service>, name: &str, class: &str) -> Result<Service> {
    let pp = PatchParams::default();
    let away = serde_json::json!({"spec": {"type": "ClusterIP"}});
    let cip = api.patch(name, &pp, &Patch::Merge(&away)).await?;
    let dropped = cip
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_class.clone());
    assert_eq!(
        dropped, None,
        "the API server drops the class with the type"
    );
    let back = serde_json::json!({"spec": {"type": "LoadBalancer", "loadBalancerClass": class}});
    Ok(api.patch(name, &pp, &Patch::Merge(&back)).await?)
}

async fn get(api: &Api<Service>, name: &str) -> Result<Service> {
    api.get_opt(name)
        .await?
        .ok_or_else(|| anyhow!("{name} is gone"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class_changes_while_no_leader_runs_are_cleaned_up_and_served_once_one_leads() -> Result<()>
{
    let cp = ControlPlane::shared().await?;
    let proxy = ApiProxy::start(cp.client().await?).await?;
    let scene = Scene::start(cp, &proxy, "faults-lbclass", 1, 1).await?;
    let (ns, admin) = (scene.ns.clone(), scene.admin.clone());
    let watch = AddressWatch::start(&admin);
    let pool = Arc::new(LocalProvider::new(LocalCloudConfig {
        pools: vec![POOL.parse()?],
        ip_mode: None,
    })?);
    let cfg = CloudLbConfig {
        cloud_provider: ProviderKind::Local,
        cluster_name: "faults-lbclass".into(),
        load_balancer_class: Some(OURS.into()),
        default_load_balancer: false,
        ..CloudLbConfig::default()
    };
    let provider = pool.clone();
    scene.ours.start("cloud-lb", "service-controller", |ctx| {
        cloud_lb::run_with_provider(ctx, cfg, provider)
    });
    let api: Api<Service> = Api::namespaced(admin.clone(), &ns);
    for (name, class) in [("leaving", OURS), ("stays", OURS), ("joining", OTHER)] {
        api.create(&PostParams::default(), &lb(&ns, name, class))
            .await?;
    }
    let served = |name: &'static str| {
        let api = api.clone();
        async move {
            let s = api.get_opt(name).await.ok()??;
            (has_finalizer(&s) && !ips(&s).is_empty()).then_some(s)
        }
    };
    let leaving = wait_for("leaving served", WAIT, || served("leaving")).await?;
    let stays = wait_for("stays served", WAIT, || served("stays")).await?;
    assert_eq!(pool.free(), 0, "the pool is full");
    let joining = get(&api, "joining").await?;
    assert!(
        !has_finalizer(&joining) && ips(&joining).is_empty(),
        "another class is not ours to serve"
    );
    let mut names = scene.services.clone();
    names.extend(["leaving", "stays", "joining"].map(String::from));
    scene.settled("before leadership is taken away").await?;

    scene.ours.set_leading(false);
    change_class(&api, "leaving", OTHER).await?;
    change_class(&api, "joining", OURS).await?;
    // Upstream's slices follow every change; once they have, ours would have too if we wrote.
    scene.settled("upstream after the class changes").await?;
    let left = get(&api, "leaving").await?;
    assert!(
        has_finalizer(&left),
        "nothing of ours written while no one led"
    );
    assert_eq!(
        ips(&left),
        Vec::<String>::new(),
        "the API server clears the status with the type"
    );
    let joined = get(&api, "joining").await?;
    assert!(
        !has_finalizer(&joined) && ips(&joined).is_empty(),
        "nothing of ours written while no one led"
    );

    let started = Instant::now();
    scene.ours.set_leading(true);
    let joined = wait_for("joining served", WAIT, || served("joining")).await?;
    wait_for("leaving cleaned up", WAIT, || async {
        let s = api.get_opt("leaving").await.ok()??;
        (!has_finalizer(&s) && ips(&s).is_empty()).then_some(())
    })
    .await?;
    assert_eq!(
        ips(&joined),
        ips(&leaving),
        "joining is served with the address leaving released (the pool has no other)"
    );
    assert_eq!(
        ips(&get(&api, "stays").await?),
        ips(&stays),
        "stays kept its address"
    );
    let left = get(&api, "leaving").await?;
    assert_eq!(
        left.spec
            .as_ref()
            .and_then(|s| s.load_balancer_class.as_deref()),
        Some(OTHER),
        "leaving is left to its new class"
    );
    // Addresses the pool holds that no Service publishes (leaving's, had it not been released).
    let publishing = api
        .list(&Default::default())
        .await?
        .items
        .iter()
        .filter(|s| !ips(s).is_empty())
        .count();
    let leaked = (POOL_SIZE - pool.free()).saturating_sub(publishing);
    let mut doubles = watch.doubles();
    doubles.extend(double_load_balancer_addresses(&admin).await?);
    let found = Found {
        doubles,
        leaked: Some(leaked),
    };
    let scenario = "no leader while LoadBalancer Services change class both ways";
    scene
        .finish_with(scenario, 2, started, &names, found)
        .await?;
    Ok(())
}

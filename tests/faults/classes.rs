//! `spec.loadBalancerClass` changes while no replica leads. The class is immutable on a
//! LoadBalancer Service, so a Service changes class by going through another type and back
//! (the API server drops the class and the status with the type). Meanwhile nothing of ours
//! may be written; once leadership returns, the Service that left our class is cleaned up
//! (finalizer removed, its address released), so is one of ours deleted meanwhile (held by our
//! finalizer), and those that joined (by the type round trip, or deleted and created again)
//! are served, from pools so small that they can only be served with the released addresses:
//! nothing is served twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, anyhow};
use cloud_lb::local::{LocalCloudConfig, LocalProvider};
use cloud_lb::{CloudLbConfig, ProviderKind};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use scm_runtime::ObjectKey;
use test_support::invariants::{AddressWatch, double_load_balancer_addresses};
use test_support::{ControlPlane, wait_for};

use crate::scene::{Found, Scene, WAIT, service, turn_alone};
use test_support::apiproxy::ApiProxy;

const FINALIZER: &str = "service.kubernetes.io/load-balancer-cleanup";
const OURS: &str = "faults.scm.test/ours";
const OTHER: &str = "faults.scm.test/other";
/// Four usable addresses in two pools (no other scenario uses them).
const POOLS: [&str; 2] = ["10.203.0.0/30", "10.203.0.4/30"];
const POOL_SIZE: usize = 4;

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
    // Alone, as the other scenario that takes leadership away: run beside the failover scenario,
    // upstream's slices of one of its Services went missing once our controllers here led again.
    let turn = turn_alone().await;
    let scene = Scene::start_in(turn, cp, &proxy, "faults-lbclass", 1, 1).await?;
    let (ns, admin) = (scene.ns.clone(), scene.admin.clone());
    let watch = AddressWatch::start(&admin);
    let pool = Arc::new(LocalProvider::new(LocalCloudConfig {
        pools: POOLS.iter().map(|p| p.parse()).collect::<Result<_, _>>()?,
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
    let start = [
        ("leaving", OURS),
        ("gone", OURS),
        ("stays", OURS),
        ("filler", OURS),
        ("joining", OTHER),
        ("recreated", OTHER),
    ];
    for (name, class) in start {
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
    let mut before = BTreeMap::new();
    for name in ["leaving", "gone", "stays", "filler"] {
        let s = wait_for(&format!("{name} served"), WAIT, || served(name)).await?;
        before.insert(name, ips(&s));
    }
    assert_eq!(pool.free(), 0, "the pools are full");
    for name in ["joining", "recreated"] {
        let s = get(&api, name).await?;
        assert!(
            !has_finalizer(&s) && ips(&s).is_empty(),
            "{name}: another class is not ours to serve"
        );
    }
    scene.settled("before leadership is taken away").await?;

    scene.ours.set_leading(false);
    change_class(&api, "leaving", OTHER).await?;
    change_class(&api, "joining", OURS).await?;
    // The other way to change class: delete and create again (nothing holds another class's).
    api.delete("gone", &DeleteParams::default()).await?;
    api.delete("recreated", &DeleteParams::default()).await?;
    wait_for("recreated deleted", WAIT, || async {
        api.get_opt("recreated").await.ok()?.is_none().then_some(())
    })
    .await?;
    api.create(&PostParams::default(), &lb(&ns, "recreated", OURS))
        .await?;
    // Our controllers' shared informer has seen all of it (a writer would act now).
    let informer = scene.ours.base.informers.services();
    wait_for("our informer to see the changes", WAIT, || async {
        let class = |name: &str| {
            let s = informer.get(&ObjectKey::new(ns.clone(), name))?;
            s.spec.as_ref()?.load_balancer_class.clone()
        };
        let gone = informer.get(&ObjectKey::new(ns.clone(), "gone"))?;
        (class("leaving").as_deref() == Some(OTHER)
            && class("joining").as_deref() == Some(OURS)
            && class("recreated").as_deref() == Some(OURS)
            && gone.metadata.deletion_timestamp.is_some())
        .then_some(())
    })
    .await?;
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
    assert!(
        has_finalizer(&get(&api, "gone").await?),
        "our finalizer holds the deleted Service while no one leads"
    );
    for name in ["joining", "recreated"] {
        let s = get(&api, name).await?;
        assert!(
            !has_finalizer(&s) && ips(&s).is_empty(),
            "{name}: nothing of ours written while no one led"
        );
    }

    let started = Instant::now();
    scene.ours.set_leading(true);
    let mut after = BTreeMap::new();
    for name in ["joining", "recreated"] {
        let s = wait_for(&format!("{name} served"), WAIT, || served(name)).await?;
        after.insert(name, ips(&s));
    }
    wait_for("leaving cleaned up, gone released", WAIT, || async {
        let s = api.get_opt("leaving").await.ok()??;
        let gone = api.get_opt("gone").await.ok()?;
        (!has_finalizer(&s) && ips(&s).is_empty() && gone.is_none()).then_some(())
    })
    .await?;
    let released: BTreeSet<&Vec<String>> = [&before["leaving"], &before["gone"]].into();
    let given: BTreeSet<&Vec<String>> = after.values().collect();
    assert_eq!(
        given, released,
        "the newly ours are served with the addresses released (the pools have no other)"
    );
    for name in ["stays", "filler"] {
        assert_eq!(
            ips(&get(&api, name).await?),
            before[name],
            "{name} kept its address"
        );
    }
    let left = get(&api, "leaving").await?;
    assert_eq!(
        left.spec
            .as_ref()
            .and_then(|s| s.load_balancer_class.as_deref()),
        Some(OTHER),
        "leaving is left to its new class"
    );
    // Addresses the pools hold that no Service publishes (a released one, had it not been).
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
    let mut names = scene.services.clone();
    names.extend(["leaving", "stays", "filler", "joining", "recreated"].map(String::from));
    let scenario = "no leader while LoadBalancer Services change class both ways (type round \
                    trip; delete and create) and one of ours is deleted";
    scene
        .finish_with(scenario, 4, started, &names, found)
        .await?;
    Ok(())
}

//! Issue 14: address pools as `LoadBalancerIPPool` objects, against the real control plane.
//! Pools are created, edited, shrunk and deleted under Services that hold addresses (no address
//! moves; conditions and Events say what happened), addresses others publish are never handed
//! out, a pin is served when its holder goes, selectors, restarts.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, anyhow};
use cloud_lb::local::crd::{
    CONFLICTING, LoadBalancerIPPool, LoadBalancerIPPoolSpec, LoadBalancerIPPoolStatus, READY,
};
use cloud_lb::local::{LocalCloudConfig, LocalProvider, REQUESTED_IPS_ANNOTATION};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use test_support::wait_for;

use crate::backoff::{Refusals, assert_served_before_backoff};
use crate::harness::*;

/// Installs the CRD the binary generates, waits until pools can be listed, and deletes every
/// pool a failed test may have left (pools are cluster-wide; the tests run one at a time).
pub async fn install_crd(client: &kube::Client) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = LoadBalancerIPPool::crd();
    let name = crd.metadata.name.clone().unwrap_or_default();
    crds.patch(
        &name,
        &PatchParams::apply("scm-tests").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    let pools: Api<LoadBalancerIPPool> = Api::all(client.clone());
    wait_for("pools can be listed", T, || async {
        pools.list(&ListParams::default().limit(1)).await.ok()
    })
    .await?;
    pools
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    wait_for("no pools left", T, || async {
        pools
            .list(&ListParams::default())
            .await
            .ok()
            .filter(|l| l.items.is_empty())
    })
    .await?;
    Ok(())
}

pub(crate) fn pools(client: &kube::Client) -> Api<LoadBalancerIPPool> {
    Api::all(client.clone())
}

/// Creates (or replaces) pool `name` with `cidrs`.
pub(crate) async fn put_pool(
    client: &kube::Client,
    name: &str,
    spec: LoadBalancerIPPoolSpec,
) -> Result<()> {
    let api = pools(client);
    match api.get_opt(name).await? {
        Some(mut p) => {
            p.spec = spec;
            api.replace(name, &PostParams::default(), &p).await?;
        }
        None => {
            api.create(&PostParams::default(), &LoadBalancerIPPool::new(name, spec))
                .await?;
        }
    }
    Ok(())
}

pub(crate) fn cidrs(c: &[&str]) -> LoadBalancerIPPoolSpec {
    LoadBalancerIPPoolSpec {
        cidrs: c.iter().map(|s| s.to_string()).collect(),
        ..LoadBalancerIPPoolSpec::default()
    }
}

/// A namespace for a pool test, with the pool CRD installed (hold [`SERIAL`] first).
pub(crate) async fn pool_setup() -> Result<(kube::Client, String)> {
    let (client, ns) = setup().await?;
    install_crd(&client).await?;
    Ok((client, ns))
}

/// Pool `name` made anew (any leftover of an earlier run deleted first) with `ranges`.
pub(crate) async fn fresh_pool(client: &kube::Client, name: &str, ranges: &[&str]) -> Result<()> {
    delete_pool(client, name).await;
    put_pool(client, name, cidrs(ranges)).await
}

pub(crate) async fn delete_pool(client: &kube::Client, name: &str) {
    let _ = pools(client).delete(name, &DeleteParams::default()).await;
}

/// Waits until pool `name`'s status satisfies `ok`.
async fn wait_pool(
    client: &kube::Client,
    name: &str,
    what: &str,
    ok: impl Fn(&LoadBalancerIPPoolStatus) -> bool,
) -> Result<LoadBalancerIPPoolStatus> {
    let api = pools(client);
    wait_for(&format!("pool {name}: {what}"), T, || async {
        api.get_opt(name)
            .await
            .ok()
            .flatten()
            .and_then(|p| p.status)
            .filter(|s| ok(s))
    })
    .await
}

fn condition<'a>(s: &'a LoadBalancerIPPoolStatus, t: &str) -> Option<(&'a str, &'a str)> {
    s.conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.as_str(), c.reason.as_str()))
}

/// A provider with no file pools: every pool is an object.
pub(crate) fn objects_only() -> Arc<LocalProvider> {
    Arc::new(LocalProvider::new(LocalCloudConfig::default()).expect("no pools is valid"))
}

pub(crate) fn pinned(ns: &str, name: &str, class: &str, ip: &str) -> Service {
    let mut s = lb_service(ns, name, Some(class), &[("http", 80, "TCP", None)]);
    s.metadata.annotations = Some([(REQUESTED_IPS_ANNOTATION.to_string(), ip.to_string())].into());
    s
}

pub(crate) async fn ips_of(client: &kube::Client, ns: &str, name: &str) -> Result<Vec<String>> {
    Ok(ips(&get(client, ns, name)
        .await
        .ok_or_else(|| anyhow!("{name} gone"))?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pool_objects_edited_shrunk_and_deleted_never_move_an_address() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = pool_setup().await?;
    let class = "test.example.com/pool-objects";
    let (p1, p2) = ("it-objects-a", "it-objects-b");
    delete_pool(&client, p1).await;
    delete_pool(&client, p2).await;
    // .1 to .6 usable.
    put_pool(&client, p1, cidrs(&["10.210.0.0/29"])).await?;
    let ctrl = Ctrl::start(&client, local_config("it-objects", class), objects_only());
    let refusals = Refusals::watch(&ctrl);
    let svc = |name: &str| lb_service(&ns, name, Some(class), &[("http", 80, "TCP", None)]);
    create(&client, &svc("a")).await?;
    assert_eq!(
        ips(&wait_status(&client, &ns, "a").await?),
        vec!["10.210.0.1"]
    );
    create(&client, &svc("b")).await?;
    assert_eq!(
        ips(&wait_status(&client, &ns, "b").await?),
        vec!["10.210.0.2"]
    );
    let st = wait_pool(&client, p1, "2 allocated, 4 available", |s| {
        s.allocated.ipv4 == 2 && s.available.ipv4 == 4
    })
    .await?;
    assert_eq!(condition(&st, READY), Some(("True", "Serving")));
    assert_eq!(condition(&st, CONFLICTING), Some(("False", "NoConflicts")));

    // Shrunk to .0-.1: b's .2 is outside it and stays with b, said on the pool and on b.
    put_pool(&client, p1, cidrs(&["10.210.0.0/31"])).await?;
    let st = wait_pool(&client, p1, "Conflicting", |s| {
        condition(s, CONFLICTING) == Some(("True", "AddressesOutsidePool"))
    })
    .await?;
    let msg = &st
        .conditions
        .iter()
        .find(|c| c.type_ == CONFLICTING)
        .expect("c")
        .message;
    assert!(msg.contains("10.210.0.2") && msg.contains("/b"), "{msg}");
    wait_event(&client, &ns, "b", "AddressOutsidePools", "10.210.0.2").await?;
    assert_eq!(ips_of(&client, &ns, "b").await?, vec!["10.210.0.2"]);
    assert_eq!(ips_of(&client, &ns, "a").await?, vec!["10.210.0.1"]);

    // Deleted: nobody moves; a new Service waits for a pool.
    delete_pool(&client, p1).await;
    create(&client, &svc("c")).await?;
    wait_event(
        &client,
        &ns,
        "c",
        "SyncLoadBalancerFailed",
        "no local pool serves",
    )
    .await?;
    assert_eq!(ips_of(&client, &ns, "a").await?, vec!["10.210.0.1"]);
    assert_eq!(ips_of(&client, &ns, "b").await?, vec!["10.210.0.2"]);

    // Addresses others publish are never handed out: another class's status, externalIPs.
    let mut foreign = lb_service(
        &ns,
        "foreign",
        Some("other.example.com/lb"),
        &[("http", 80, "TCP", None)],
    );
    foreign.metadata.annotations = None;
    create(&client, &foreign).await?;
    Api::<Service>::namespaced(client.clone(), &ns)
        .patch_status(
            "foreign",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": "10.210.1.1"}]}}})),
        )
        .await?;
    let mut ext = svc("ext");
    if let Some(sp) = ext.spec.as_mut() {
        sp.type_ = Some("ClusterIP".into());
        sp.load_balancer_class = None;
        sp.external_ips = Some(vec!["10.210.1.2".into()]);
    }
    create(&client, &ext).await?;
    // Let c back off a while first, until no retry of its is due soon: the pool's creation
    // itself must bring it back.
    let next_retry = refusals.wait_quiet(3).await?;
    let created = Instant::now();
    put_pool(&client, p2, cidrs(&["10.210.1.0/29"])).await?;
    let c = wait_for("c served by the new pool", T, || async {
        get(&client, &ns, "c").await.filter(|s| !ips(s).is_empty())
    })
    .await?;
    assert_served_before_backoff("c", created, Instant::now(), next_retry);
    assert_eq!(
        ips(&c),
        vec!["10.210.1.3"],
        "skips .1 (foreign status) and .2 (externalIPs)"
    );

    // A restart: everybody keeps their address, the one outside every pool too.
    ctrl.stop().await;
    let ctrl = Ctrl::start(&client, local_config("it-objects", class), objects_only());
    create(&client, &svc("d")).await?;
    assert_eq!(
        ips(&wait_status(&client, &ns, "d").await?),
        vec!["10.210.1.4"]
    );
    for (name, want) in [
        ("a", "10.210.0.1"),
        ("b", "10.210.0.2"),
        ("c", "10.210.1.3"),
    ] {
        assert_eq!(
            ips_of(&client, &ns, name).await?,
            vec![want],
            "{name} kept its address"
        );
    }
    wait_pool(&client, p2, "c and d counted", |s| {
        s.allocated.ipv4 == 2 && s.available.ipv4 == 2
    })
    .await?;
    ctrl.stop().await;
    delete_pool(&client, p2).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pinned_request_is_served_as_soon_as_its_holder_releases_it() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = pool_setup().await?;
    let class = "test.example.com/pins";
    let p = "it-pins";
    fresh_pool(&client, p, &["10.211.0.0/30"]).await?;
    let ctrl = Ctrl::start(&client, local_config("it-pins", class), objects_only());
    let refusals = Refusals::watch(&ctrl);
    create(&client, &pinned(&ns, "holder", class, "10.211.0.1")).await?;
    assert_eq!(
        ips(&wait_status(&client, &ns, "holder").await?),
        vec!["10.211.0.1"]
    );
    let asked = create(&client, &pinned(&ns, "waiter", class, "10.211.0.1")).await?;
    wait_event(
        &client,
        &ns,
        "waiter",
        "SyncLoadBalancerFailed",
        "already used",
    )
    .await?;
    // An unpinned Service never takes the address the waiter pins, even once it is free.
    create(
        &client,
        &lb_service(&ns, "free", Some(class), &[("http", 80, "TCP", None)]),
    )
    .await?;
    assert_eq!(
        ips(&wait_status(&client, &ns, "free").await?),
        vec!["10.211.0.2"]
    );
    // Let the waiter back off a while, then release when no backoff retry of its is due
    // soon: it is served before one can come (the release brought it back), unedited.
    let next_retry = refusals.wait_quiet(3).await?;
    let released = Instant::now();
    Api::<Service>::namespaced(client.clone(), &ns)
        .delete("holder", &DeleteParams::default())
        .await?;
    let served = wait_for("the waiter gets its pin", T, || async {
        get(&client, &ns, "waiter")
            .await
            .filter(|s| !ips(s).is_empty())
    })
    .await?;
    assert_served_before_backoff("the waiter", released, Instant::now(), next_retry);
    assert_eq!(ips(&served), vec!["10.211.0.1"]);
    assert_eq!(served.spec, asked.spec, "nobody edited the waiter");
    ctrl.stop().await;
    delete_pool(&client, p).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn selectors_decide_which_services_draw_from_a_pool() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = pool_setup().await?;
    let class = "test.example.com/selectors";
    let (team, bad) = ("it-sel-team", "it-sel-bad");
    delete_pool(&client, team).await;
    delete_pool(&client, bad).await;
    let mut spec = cidrs(&["10.212.0.0/30"]);
    spec.service_selector = Some(LabelSelector {
        match_labels: Some([("team".to_string(), "a".to_string())].into()),
        ..Default::default()
    });
    put_pool(&client, team, spec).await?;
    // An invalid pool says so and does not stop the other from serving.
    put_pool(&client, bad, cidrs(&["10.213.0.0/33"])).await?;
    let ctrl = Ctrl::start(&client, local_config("it-sel", class), objects_only());
    let st = wait_pool(&client, team, "no Service selected yet", |s| {
        condition(s, READY) == Some(("True", "SelectorMatchesNothing"))
    })
    .await?;
    assert_eq!(st.available.ipv4, 2);
    let st = wait_pool(&client, bad, "not Ready", |s| {
        condition(s, READY) == Some(("False", "InvalidSpec"))
    })
    .await?;
    assert_eq!(st.available.ipv4, 0);
    create(
        &client,
        &lb_service(&ns, "other", Some(class), &[("http", 80, "TCP", None)]),
    )
    .await?;
    wait_event(
        &client,
        &ns,
        "other",
        "SyncLoadBalancerFailed",
        "no local pool serves",
    )
    .await?;
    let mut mine = lb_service(&ns, "mine", Some(class), &[("http", 80, "TCP", None)]);
    mine.metadata.labels = Some([("team".to_string(), "a".to_string())].into());
    create(&client, &mine).await?;
    assert_eq!(
        ips(&wait_status(&client, &ns, "mine").await?),
        vec!["10.212.0.1"]
    );
    wait_pool(&client, team, "serving its Service", |s| {
        condition(s, READY) == Some(("True", "Serving")) && s.allocated.ipv4 == 1
    })
    .await?;
    assert!(ips_of(&client, &ns, "other").await?.is_empty());
    ctrl.stop().await;
    delete_pool(&client, team).await;
    delete_pool(&client, bad).await;
    Ok(())
}

/// Two replicas, leadership moved in the middle of a burst of Services: every Service gets an
/// address, none is given twice (watched all along), and none moves after the failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_in_the_middle_of_assignments_gives_no_address_twice() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = pool_setup().await?;
    let watch = test_support::invariants::AddressWatch::start(&client);
    let class = "test.example.com/pool-failover";
    let p = "it-failover";
    put_pool(&client, p, cidrs(&["10.214.0.0/27"])).await?;
    let config = local_config("it-failover", class);
    let r1 = Ctrl::start_as(&client, config.clone(), objects_only(), true);
    let r2 = Ctrl::start_as(&client, config.clone(), objects_only(), false);
    let svc = |name: String| lb_service(&ns, &name, Some(class), &[("http", 80, "TCP", None)]);
    for i in 0..20 {
        if i == 10 {
            // Mid-burst: r1 stops leading, r2 takes over (its own, never-led memory).
            r1.set_leading(false);
            r2.set_leading(true);
        }
        create(&client, &svc(format!("s{i}"))).await?;
    }
    let mut seen = std::collections::BTreeMap::new();
    for i in 0..20 {
        let name = format!("s{i}");
        let got = ips(&wait_status(&client, &ns, &name).await?);
        assert_eq!(got.len(), 1, "{name}: {got:?}");
        seen.insert(name, got[0].clone());
    }
    let distinct: std::collections::BTreeSet<&String> = seen.values().collect();
    assert_eq!(distinct.len(), 20, "an address given twice: {seen:?}");
    // Back to r1 (stale memory from its first term): nobody moves, nothing is given twice.
    r2.set_leading(false);
    r1.set_leading(true);
    create(&client, &svc("late".into())).await?;
    let late = ips(&wait_status(&client, &ns, "late").await?);
    assert!(
        !distinct.contains(&late[0]),
        "late got a held address {late:?}"
    );
    for (name, want) in &seen {
        assert_eq!(&ips_of(&client, &ns, name).await?[0], want, "{name} moved");
    }
    let mut doubles = watch.doubles();
    doubles.extend(test_support::invariants::double_load_balancer_addresses(&client).await?);
    assert!(doubles.is_empty(), "an address held twice: {doubles:?}");
    wait_pool(&client, p, "21 allocated", |s| {
        s.allocated.ipv4 == 21 && s.available.ipv4 == 9
    })
    .await?;
    r1.stop().await;
    r2.stop().await;
    delete_pool(&client, p).await;
    Ok(())
}

//! The local address-pool provider: requests, exhaustion (and the chaos scenario of a full
//! pool freed), restarts and leadership terms.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use cloud_lb::local::{LocalCloudConfig, LocalProvider, REQUESTED_IPS_ANNOTATION};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams};
use test_support::chaos::{Row, report};
use test_support::invariants::{AddressWatch, double_load_balancer_addresses};
use test_support::wait_for;

use crate::backoff::{Refusals, assert_served_before_backoff};
use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_pools_requests_exhaustion_and_restart() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let class = "test.example.com/local";
    // Two usable addresses: .1 and .2.
    let pools = || local_pool("10.200.0.0/30");
    let config = local_config("it-local", class);
    let ctrl = Ctrl::start(&client, config.clone(), pools());
    let mut a = lb_service(&ns, "a", Some(class), &[("http", 80, "TCP", None)]);
    a.metadata.annotations = Some(
        [(
            REQUESTED_IPS_ANNOTATION.to_string(),
            "10.200.0.2".to_string(),
        )]
        .into(),
    );
    create(&client, &a).await?;
    let a = wait_status(&client, &ns, "a").await?;
    assert_eq!(ips(&a), vec!["10.200.0.2"]);
    let mode = a
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .and_then(|i| i[0].ip_mode.clone());
    assert_eq!(mode.as_deref(), Some("VIP"));
    create(
        &client,
        &lb_service(&ns, "b", Some(class), &[("http", 80, "TCP", None)]),
    )
    .await?;
    let b = wait_status(&client, &ns, "b").await?;
    assert_eq!(ips(&b), vec!["10.200.0.1"]);

    // Exhausted: an Event, and retries.
    create(
        &client,
        &lb_service(&ns, "c", Some(class), &[("http", 80, "TCP", None)]),
    )
    .await?;
    wait_event(
        &client,
        &ns,
        "c",
        "SyncLoadBalancerFailed",
        "no free IPv4 address",
    )
    .await?;
    // Outside the pools, and taken: Events.
    let mut d = lb_service(&ns, "d", Some(class), &[("http", 80, "TCP", None)]);
    d.metadata.annotations =
        Some([(REQUESTED_IPS_ANNOTATION.to_string(), "10.9.9.9".to_string())].into());
    create(&client, &d).await?;
    wait_event(
        &client,
        &ns,
        "d",
        "SyncLoadBalancerFailed",
        "outside every local pool",
    )
    .await?;
    let mut e = lb_service(&ns, "e", Some(class), &[("http", 80, "TCP", None)]);
    e.metadata.annotations = Some(
        [(
            REQUESTED_IPS_ANNOTATION.to_string(),
            "10.200.0.2".to_string(),
        )]
        .into(),
    );
    create(&client, &e).await?;
    wait_event(&client, &ns, "e", "SyncLoadBalancerFailed", "already used").await?;

    // Restart with empty memory: a and b keep their addresses; c still waits.
    ctrl.stop().await;
    let ctrl = Ctrl::start(&client, config.clone(), pools());
    // Five finished reconciles need not be five Services (c is retried, and a write queues
    // its Service again): "a and b keep their addresses" means something once every listed
    // Service had its turn.
    wait_for("reconciles after restart", T, || async {
        (ctrl.reconciles_done() >= 5).then_some(())
    })
    .await?;
    ctrl.wait_idle().await?;
    assert_eq!(
        ips(&get(&client, &ns, "a").await.ok_or_else(|| anyhow!("a"))?),
        vec!["10.200.0.2"]
    );
    assert_eq!(
        ips(&get(&client, &ns, "b").await.ok_or_else(|| anyhow!("b"))?),
        vec!["10.200.0.1"]
    );
    assert!(ips(&get(&client, &ns, "c").await.ok_or_else(|| anyhow!("c"))?).is_empty());

    // e's pin on 10.200.0.2 would now be served first once a releases it (issue 14; see
    // pool_objects.rs): it goes, so the unpinned c is the one waiting.
    Api::<Service>::namespaced(client.clone(), &ns)
        .delete("e", &DeleteParams::default())
        .await?;
    wait_for("e gone", T, || async {
        get(&client, &ns, "e").await.is_none().then_some(())
    })
    .await?;
    // Deleting a releases 10.200.0.2; c gets it on its next retry.
    Api::<Service>::namespaced(client.clone(), &ns)
        .delete("a", &DeleteParams::default())
        .await?;
    wait_for("a gone", T, || async {
        get(&client, &ns, "a").await.is_none().then_some(())
    })
    .await?;
    let c = wait_for(
        "c gets the freed address",
        Duration::from_secs(90),
        || async { get(&client, &ns, "c").await.filter(|s| !ips(s).is_empty()) },
    )
    .await?;
    assert_eq!(ips(&c), vec!["10.200.0.2"]);
    ctrl.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_pool_state_is_rebuilt_each_leadership_term() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let class = "test.example.com/terms";
    let pools = || local_pool("10.201.0.0/30");
    let config = local_config("it-terms", class);
    let requesting = |name: &str, ip: Option<&str>| {
        let mut s = lb_service(&ns, name, Some(class), &[("http", 80, "TCP", None)]);
        if let Some(ip) = ip {
            s.metadata.annotations =
                Some([(REQUESTED_IPS_ANNOTATION.to_string(), ip.to_string())].into());
        }
        s
    };
    // Two replicas; p1 leads first.
    let p1 = Ctrl::start_as(&client, config.clone(), pools(), true);
    let p2 = Ctrl::start_as(&client, config.clone(), pools(), false);
    create(&client, &requesting("a", Some("10.201.0.1"))).await?;
    assert_eq!(
        ips(&wait_status(&client, &ns, "a").await?),
        vec!["10.201.0.1"]
    );

    // p2 takes over and changes the world while p1 follows.
    p1.set_leading(false);
    p2.set_leading(true);
    create(&client, &requesting("b", Some("10.201.0.2"))).await?;
    assert_eq!(
        ips(&wait_status(&client, &ns, "b").await?),
        vec!["10.201.0.2"]
    );
    Api::<Service>::namespaced(client.clone(), &ns)
        .delete("a", &DeleteParams::default())
        .await?;
    wait_for("a gone", T, || async {
        get(&client, &ns, "a").await.is_none().then_some(())
    })
    .await?;
    create(&client, &requesting("c", None)).await?;
    assert_eq!(
        ips(&wait_status(&client, &ns, "c").await?),
        vec!["10.201.0.1"]
    );

    // p1 leads again: what it remembers is stale (a held .1, .2 was free). It must rebuild
    // from the Services, so the pool is full and d gets nothing rather than a duplicate.
    p2.set_leading(false);
    p1.set_leading(true);
    create(&client, &requesting("d", None)).await?;
    wait_event(
        &client,
        &ns,
        "d",
        "SyncLoadBalancerFailed",
        "no free IPv4 address",
    )
    .await?;
    assert!(ips(&get(&client, &ns, "d").await.ok_or_else(|| anyhow!("d"))?).is_empty());
    assert_eq!(
        ips(&get(&client, &ns, "b").await.ok_or_else(|| anyhow!("b"))?),
        vec!["10.201.0.2"]
    );
    assert_eq!(
        ips(&get(&client, &ns, "c").await.ok_or_else(|| anyhow!("c"))?),
        vec!["10.201.0.1"]
    );
    p1.stop().await;
    p2.stop().await;
    Ok(())
}

/// Issue 12's "pool exhausted then freed": a full pool leaves one more Service pending (a
/// Warning Event, no address); once a holder is deleted the pending Service gets the freed
/// address at once, with nobody editing it, and no address is ever published by two Services.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pool_exhausted_then_freed_serves_the_pending_service_without_an_edit() -> Result<()> {
    let _g = SERIAL.lock().await;
    test_support::invariants::count_panics();
    let (client, ns) = setup().await?;
    let watch = AddressWatch::start(&client);
    let class = "test.example.com/exhausted";
    // Six usable addresses: .1 to .6 (network and broadcast are never handed out).
    let pool = Arc::new(LocalProvider::new(LocalCloudConfig {
        pools: vec!["10.202.0.0/29".parse()?],
        ip_mode: None,
    })?);
    const SIZE: usize = 6;
    let ctrl = Ctrl::start(&client, local_config("it-exhausted", class), pool.clone());
    let refusals = Refusals::watch(&ctrl);
    let svc = |name: &str| lb_service(&ns, name, Some(class), &[("http", 80, "TCP", None)]);
    let holders: Vec<String> = (0..SIZE).map(|i| format!("holder-{i}")).collect();
    for h in &holders {
        create(&client, &svc(h)).await?;
    }
    let mut held = BTreeMap::new();
    for h in &holders {
        held.insert(h.clone(), ips(&wait_status(&client, &ns, h).await?));
    }
    let distinct: BTreeSet<&Vec<String>> = held.values().collect();
    assert_eq!(distinct.len(), SIZE, "one address each: {held:?}");
    assert_eq!(pool.free(), 0, "the pool is full");

    let asked = create(&client, &svc("pending")).await?;
    let note = wait_event(
        &client,
        &ns,
        "pending",
        "SyncLoadBalancerFailed",
        "no free IPv4 address",
    )
    .await?;
    assert!(note.contains("local pools"), "a clear reason: {note}");
    // Let it back off for a while, as a Service waiting for capacity would: four refusals at
    // least, and no retry of its due soon (backoff 5, 10, 20, 40 s; one timer per refusal).
    // (Only pending's ensures fail so: the holders' conflicts on status writes count as kube.)
    let next_retry = refusals.wait_quiet(4).await?;
    let refused = refusals.count() as u64;
    let pending = get(&client, &ns, "pending")
        .await
        .ok_or_else(|| anyhow!("pending gone"))?;
    assert!(
        ips(&pending).is_empty(),
        "no address while the pool is full"
    );

    let freed = held.remove(&holders[0]).unwrap_or_default();
    let released = Instant::now();
    Api::<Service>::namespaced(client.clone(), &ns)
        .delete(&holders[0], &DeleteParams::default())
        .await?;
    let served = wait_for("pending gets the freed address", T, || async {
        get(&client, &ns, "pending")
            .await
            .filter(|s| !ips(s).is_empty())
    })
    .await?;
    let converged_in = released.elapsed();
    // Its backoff would have waited longer: the release itself must bring it back.
    assert_served_before_backoff("pending", released, released + converged_in, next_retry);
    wait_for("the holder gone", T, || async {
        get(&client, &ns, &holders[0]).await.is_none().then_some(())
    })
    .await?;
    assert_eq!(
        ips(&served),
        freed,
        "the pending Service got the freed address"
    );
    assert_eq!(served.spec, asked.spec, "nobody edited the pending Service");
    for (h, want) in &held {
        let now = get(&client, &ns, h).await.map(|s| ips(&s));
        assert_eq!(now.as_ref(), Some(want), "{h} kept its address");
    }

    // Everything deleted: every address goes back to the pool (none leaked in its memory).
    let api = Api::<Service>::namespaced(client.clone(), &ns);
    for name in holders[1..].iter().map(String::as_str).chain(["pending"]) {
        api.delete(name, &DeleteParams::default()).await?;
    }
    let all_free = wait_for("every address back in the pool", T, || async {
        (pool.free() == SIZE).then_some(())
    })
    .await;
    // The invariants: the row first, so that the table shows a broken one.
    let mut doubles = watch.doubles();
    doubles.extend(double_load_balancer_addresses(&client).await?);
    report(&Row {
        scenario: "local pool full, one pending, then a holder deleted",
        faults: refused,
        converged_in,
        slices_differ: None,
        doubles: doubles.len(),
        leaked: Some(SIZE - pool.free()),
        panics: test_support::invariants::panics(),
    });
    assert!(doubles.is_empty(), "an address held twice: {doubles:?}");
    all_free?;
    assert_eq!(
        test_support::invariants::panics(),
        0,
        "a panic in this process"
    );
    ctrl.stop().await;
    Ok(())
}

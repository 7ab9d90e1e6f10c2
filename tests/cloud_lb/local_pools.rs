//! The local address-pool provider: requests, exhaustion, restarts and leadership terms.

use std::time::Duration;

use anyhow::{Result, anyhow};
use cloud_lb::local::REQUESTED_IPS_ANNOTATION;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams};
use test_support::wait_for;

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
    wait_for("reconciles after restart", T, || async {
        (ctrl.reconciles_done() >= 5).then_some(())
    })
    .await?;
    assert_eq!(
        ips(&get(&client, &ns, "a").await.ok_or_else(|| anyhow!("a"))?),
        vec!["10.200.0.2"]
    );
    assert_eq!(
        ips(&get(&client, &ns, "b").await.ok_or_else(|| anyhow!("b"))?),
        vec!["10.200.0.1"]
    );
    assert!(ips(&get(&client, &ns, "c").await.ok_or_else(|| anyhow!("c"))?).is_empty());

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

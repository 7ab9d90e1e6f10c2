//! The local provider's address sharing (`service-controller-manager.io/allow-shared-ip`, as
//! MetalLB's) and pins held by another implementation, against the control plane.

use std::time::Instant;

use anyhow::Result;
use cloud_lb::local::ALLOW_SHARED_IP_ANNOTATION;
use cloud_lb::local::REQUESTED_IPS_ANNOTATION;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use test_support::wait_for;

use crate::backoff::{RETRYABLE, Refusals, assert_served_before_backoff};
use crate::harness::*;
use crate::pool_objects::{delete_pool, fresh_pool, ips_of, objects_only, pinned, pool_setup};

/// A Service of `class` on `port`/TCP that shares under `key`, pinned to `pin` if given.
fn sharer(ns: &str, name: &str, class: &str, key: &str, port: i32, pin: Option<&str>) -> Service {
    let mut s = lb_service(ns, name, Some(class), &[("p", port, "TCP", None)]);
    let mut ann = std::collections::BTreeMap::from([(
        ALLOW_SHARED_IP_ANNOTATION.to_string(),
        key.to_string(),
    )]);
    if let Some(ip) = pin {
        ann.insert(REQUESTED_IPS_ANNOTATION.to_string(), ip.to_string());
    }
    s.metadata.annotations = Some(ann);
    s
}

/// Deletes a Service and waits until it is gone (the controller released it: finalizer off).
async fn delete_and_wait(client: &kube::Client, ns: &str, name: &str) -> Result<()> {
    Api::<Service>::namespaced(client.clone(), ns)
        .delete(name, &DeleteParams::default())
        .await?;
    wait_for(&format!("{name} gone"), T, || async {
        get(client, ns, name).await.is_none().then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn services_with_one_key_share_an_address_until_the_last_goes() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = pool_setup().await?;
    let class = "test.example.com/sharing";
    let p = "it-sharing";
    // .1 and .2 usable.
    fresh_pool(&client, p, &["10.216.0.0/30"]).await?;
    let ctrl = Ctrl::start(&client, local_config("it-sharing", class), objects_only());
    create(&client, &sharer(&ns, "http", class, "web", 80, None)).await?;
    assert_eq!(
        ips(&wait_status(&client, &ns, "http").await?),
        vec!["10.216.0.1"]
    );
    // Same key, other port: joins the address rather than taking the free .2.
    create(&client, &sharer(&ns, "https", class, "web", 443, None)).await?;
    assert_eq!(
        ips(&wait_status(&client, &ns, "https").await?),
        vec!["10.216.0.1"]
    );
    // Same key, clashing port: another address.
    create(&client, &sharer(&ns, "http2", class, "web", 80, None)).await?;
    assert_eq!(
        ips(&wait_status(&client, &ns, "http2").await?),
        vec!["10.216.0.2"]
    );
    // Pinned to the shared address with a clashing port: Warning, pending.
    create(
        &client,
        &sharer(&ns, "clash", class, "web", 443, Some("10.216.0.1")),
    )
    .await?;
    wait_event(
        &client,
        &ns,
        "clash",
        "SyncLoadBalancerFailed",
        "port TCP/443 is already used",
    )
    .await?;
    // Pinned without asking to share: Warning, pending.
    let lone = create(&client, &pinned(&ns, "lone", class, "10.216.0.1")).await?;
    wait_event(
        &client,
        &ns,
        "lone",
        "SyncLoadBalancerFailed",
        "already used",
    )
    .await?;
    delete_and_wait(&client, &ns, "clash").await?;
    let st = wait_for("the pool counts the shared address once", T, || async {
        let p = crate::pool_objects::pools(&client).get(p).await.ok()?;
        p.status
            .filter(|s| s.allocated.ipv4 == 2 && s.available.ipv4 == 0)
    })
    .await?;
    assert_eq!(st.allocated.ipv4, 2);

    // A restart (a new provider, state rebuilt from the statuses) keeps the sharing.
    ctrl.stop().await;
    let ctrl = Ctrl::start(&client, local_config("it-sharing", class), objects_only());
    let refusals = Refusals::watch(&ctrl);
    wait_for("lone refused again after the restart", T, || async {
        (ctrl.count(RETRYABLE) >= 1).then_some(())
    })
    .await?;
    for (name, ip) in [
        ("http", "10.216.0.1"),
        ("https", "10.216.0.1"),
        ("http2", "10.216.0.2"),
    ] {
        assert_eq!(ips_of(&client, &ns, name).await?, vec![ip], "{name}");
    }

    // The first sharer goes: the address stays with the other, lone keeps waiting.
    let before = ctrl.count(RETRYABLE);
    delete_and_wait(&client, &ns, "http").await?;
    wait_for("lone retried after the release", T, || async {
        (ctrl.count(RETRYABLE) > before).then_some(())
    })
    .await?;
    assert!(ips_of(&client, &ns, "lone").await?.is_empty());
    assert_eq!(ips_of(&client, &ns, "https").await?, vec!["10.216.0.1"]);
    // The last sharer goes once no retry of lone's is due soon: lone gets it before one can
    // come (the release brings it back), unedited.
    let next_retry = refusals.wait_quiet(1).await?;
    let released = Instant::now();
    delete_and_wait(&client, &ns, "https").await?;
    let served = wait_for("lone gets its pin", T, || async {
        get(&client, &ns, "lone")
            .await
            .filter(|s| !ips(s).is_empty())
    })
    .await?;
    assert_served_before_backoff("lone", released, Instant::now(), next_retry);
    assert_eq!(ips(&served), vec!["10.216.0.1"]);
    assert_eq!(served.spec, lone.spec);
    ctrl.stop().await;
    delete_pool(&client, p).await;
    Ok(())
}

// Failed before the fix: the held pin was retried only when its backoff ran out (a foreign
// Service's status is no release of ours), about 10 s after the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pin_held_by_another_class_is_served_as_soon_as_it_lets_go() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = pool_setup().await?;
    let class = "test.example.com/foreign-pin";
    let p = "it-foreign-pin";
    fresh_pool(&client, p, &["10.217.0.0/30"]).await?;
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    // Another implementation's Service publishes .1.
    create(
        &client,
        &lb_service(
            &ns,
            "theirs",
            Some("other.example.com/lb"),
            &[("http", 80, "TCP", None)],
        ),
    )
    .await?;
    let publish = |ingress: serde_json::Value| serde_json::json!({"status": {"loadBalancer": {"ingress": ingress}}});
    api.patch_status(
        "theirs",
        &PatchParams::default(),
        &Patch::Merge(&publish(serde_json::json!([{"ip": "10.217.0.1"}]))),
    )
    .await?;
    let ctrl = Ctrl::start(
        &client,
        local_config("it-foreign-pin", class),
        objects_only(),
    );
    let refusals = Refusals::watch(&ctrl);
    let asked = create(&client, &pinned(&ns, "waiter", class, "10.217.0.1")).await?;
    wait_event(
        &client,
        &ns,
        "waiter",
        "SyncLoadBalancerFailed",
        "published by another implementation",
    )
    .await?;
    // Three refusals come at once (the finalizer patch and the Warning queue it again), then
    // one per backoff timer (each refusal sets its own: 5, 10, 20, 40 s after it): release
    // once none is due soon.
    let next_retry = refusals.wait_quiet(4).await?;
    let released = Instant::now();
    api.patch_status(
        "theirs",
        &PatchParams::default(),
        &Patch::Merge(&publish(serde_json::Value::Null)),
    )
    .await?;
    let served = wait_for("the waiter gets its pin", T, || async {
        get(&client, &ns, "waiter")
            .await
            .filter(|s| !ips(s).is_empty())
    })
    .await?;
    assert_served_before_backoff("the waiter", released, Instant::now(), next_retry);
    assert_eq!(ips(&served), vec!["10.217.0.1"]);
    assert_eq!(served.spec, asked.spec, "nobody edited the waiter");
    ctrl.stop().await;
    delete_pool(&client, p).await;
    Ok(())
}

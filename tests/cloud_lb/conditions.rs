//! The `LoadBalancerReady` condition with the local provider on the real API server: True once
//! the address is published, False with `PoolExhausted` while the pool is full and with
//! `InvalidAnnotation` for an address outside every pool, cleared when the Service stops being
//! ours (type changed away), and no condition write while
//! periodic passes find everything in place.

use std::time::Duration;

use anyhow::{Result, bail};
use cloud_lb::local::REQUESTED_IPS_ANNOTATION;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, DeleteParams};
use test_support::wait_stable;

use crate::harness::*;

const TYPE: &str = "LoadBalancerReady";

fn condition(svc: &Service) -> Option<Condition> {
    svc.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == TYPE)
        .cloned()
}

/// Polls until `name`'s condition satisfies `check` (`None`: absent).
async fn wait_condition<F>(
    client: &kube::Client,
    ns: &str,
    name: &str,
    what: &str,
    check: F,
) -> Result<Service>
where
    F: Fn(Option<&Condition>) -> bool,
{
    let deadline = tokio::time::Instant::now() + T;
    let mut last = None;
    loop {
        if let Some(s) = get(client, ns, name).await {
            if check(condition(&s).as_ref()) {
                return Ok(s);
            }
            last = condition(&s);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out waiting for {name}: {what}; last {TYPE}: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls until `name`'s `LoadBalancerReady` has `status` and `reason`.
pub(crate) async fn wait_reason(
    client: &kube::Client,
    ns: &str,
    name: &str,
    status: &str,
    reason: &str,
) -> Result<Condition> {
    let s = wait_condition(client, ns, name, reason, |c| {
        c.is_some_and(|c| c.status == status && c.reason == reason)
    })
    .await?;
    condition(&s).ok_or_else(|| anyhow::anyhow!("condition vanished"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_balancer_ready_appears_clears_and_stays_quiet() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let class = "test.example.com/local-cond";
    // Two usable addresses: .1 and .2, a range no other test uses (the local provider never
    // hands out an address another Service publishes). A short periodic pass, so steady state is exercised.
    let ctrl = Ctrl::start_every(
        &client,
        local_config("it-cond", class),
        local_pool("10.221.0.0/30"),
        Duration::from_millis(500),
    );
    let port = [("http", 80, "TCP", None)];
    for name in ["a", "b"] {
        create(&client, &lb_service(&ns, name, Some(class), &port)).await?;
    }
    for name in ["a", "b"] {
        let c = wait_reason(&client, &ns, name, "True", "LoadBalancerProvisioned").await?;
        let svc = get(&client, &ns, name).await;
        // kube-apiserver keeps no generation on Services; observedGeneration follows it.
        assert_eq!(
            c.observed_generation,
            svc.and_then(|s| s.metadata.generation)
        );
    }
    let a = wait_status(&client, &ns, "a").await?;
    assert!(
        condition(&a).is_some(),
        "published before or with the condition"
    );

    // Full pool.
    create(&client, &lb_service(&ns, "c", Some(class), &port)).await?;
    let full = wait_reason(&client, &ns, "c", "False", "PoolExhausted").await?;
    assert!(full.message.contains("no free"), "{}", full.message);
    // Address outside every pool: permanent.
    let mut d = lb_service(&ns, "d", Some(class), &port);
    d.metadata.annotations =
        Some([(REQUESTED_IPS_ANNOTATION.to_string(), "10.9.9.9".to_string())].into());
    create(&client, &d).await?;
    wait_reason(&client, &ns, "d", "False", "InvalidAnnotation").await?;

    // Steady state: periodic passes over four Services write no condition.
    let writes = |c: &Ctrl| c.count("service_controller_manager_condition_writes_total");
    let settled = wait_stable(
        "condition writes settled",
        T,
        Duration::from_millis(300),
        5,
        || async { Some(writes(&ctrl)) },
    )
    .await?;
    let r0 = ctrl.reconciles_done();
    test_support::wait_for("ten more reconciles", T, || async {
        (ctrl.reconciles_done() >= r0 + 10).then_some(())
    })
    .await?;
    let a_rv = get(&client, &ns, "a")
        .await
        .and_then(|s| s.metadata.resource_version);
    assert_eq!(writes(&ctrl), settled, "no condition write at steady state");
    let r1 = ctrl.reconciles_done();
    test_support::wait_for("five more reconciles", T, || async {
        (ctrl.reconciles_done() >= r1 + 5).then_some(())
    })
    .await?;
    assert_eq!(
        get(&client, &ns, "a")
            .await
            .and_then(|s| s.metadata.resource_version),
        a_rv,
        "a published Service is not written at steady state"
    );

    // b released: c gets its address, its condition flips to True.
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    api.delete("b", &DeleteParams::default()).await?;
    let ok = wait_reason(&client, &ns, "c", "True", "LoadBalancerProvisioned").await?;
    assert!(ok.last_transition_time.0 >= full.last_transition_time.0);

    // Type changed away: not ours to serve, the condition goes.
    patch(
        &client,
        &ns,
        "a",
        serde_json::json!({"spec": {"type": "ClusterIP", "loadBalancerClass": null}}),
    )
    .await?;
    wait_condition(&client, &ns, "a", "removed after the type change", |c| {
        c.is_none()
    })
    .await?;
    // A parked Service (refused for good) that leaves: its False goes too.
    patch(
        &client,
        &ns,
        "d",
        serde_json::json!({"spec": {"type": "ClusterIP", "loadBalancerClass": null}}),
    )
    .await?;
    wait_condition(&client, &ns, "d", "removed after leaving", |c| c.is_none()).await?;
    // Leave no published address behind for later tests.
    api.delete("c", &DeleteParams::default()).await?;
    test_support::wait_for("c gone", T, || async {
        get(&client, &ns, "c").await.is_none().then_some(())
    })
    .await?;
    ctrl.stop().await;
    Ok(())
}

/// The AWS provider's failures against moto (faults injected in front of it): `Throttled`,
/// `QuotaExceeded` and `SubnetsNotFound` appear, and each clears to `True` once the cloud
/// answers again (the permanent one after the Service changes, as a refusal waits for).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_balancer_ready_reasons_from_aws() -> Result<()> {
    use crate::aws::Aws;
    use test_support::moto::Fault;

    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-cond-aws").await?;
    let class = "test.example.com/cond-aws";
    node(&client, "cond-aws-a").await?;
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    let port = [("http", 80, "TCP", None)];
    let cases = [
        (
            "t",
            Fault::throttle(Some("CreateLoadBalancer"), 10_000),
            "Throttled",
        ),
        (
            "q",
            Fault::code(
                Some("CreateLoadBalancer"),
                400,
                "TooManyLoadBalancers",
                10_000,
            ),
            "QuotaExceeded",
        ),
        (
            "s",
            Fault::code(Some("CreateLoadBalancer"), 400, "SubnetNotFound", 10_000),
            "SubnetsNotFound",
        ),
    ];
    for (name, fault, reason) in cases {
        aws.proxy.inject(fault);
        create(&client, &lb_service(&ns, name, Some(class), &port)).await?;
        let c = wait_reason(&client, &ns, name, "False", reason).await?;
        assert!(!c.message.is_empty());
        aws.proxy.clear_faults();
        if reason == "SubnetsNotFound" {
            // Refused for good: retried once the Service changes.
            patch(
                &client,
                &ns,
                name,
                serde_json::json!({"metadata": {"annotations": {"example.com/touch": "1"}}}),
            )
            .await?;
        }
        wait_reason(&client, &ns, name, "True", "LoadBalancerProvisioned").await?;
    }
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    for name in ["t", "q", "s"] {
        api.delete(name, &DeleteParams::default()).await?;
    }
    for name in ["t", "q", "s"] {
        test_support::wait_for("deleted", T, || async {
            get(&client, &ns, name).await.is_none().then_some(())
        })
        .await?;
    }
    ctrl.stop().await;
    Ok(())
}

//! What the periodic pass repairs and what the controller refuses to take over (issue 12,
//! defects 4 and 7): a load balancer deleted out of band is recreated and the status follows;
//! a class-less Service another controller already serves is left alone.

use std::time::Duration;

use anyhow::{Result, anyhow};
use cloud_lb::{CloudLbConfig, SERVED_ELSEWHERE};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams};
use test_support::chaos::{Row, report};
use test_support::invariants::{count_panics, double_allocations, panics};
use test_support::invariants::{dangling_load_balancer_status, leaked_cloud_resources};
use test_support::moto::Fault;
use test_support::wait_for;

use crate::aws::Aws;
use crate::harness::*;

/// Short enough that a test sees a few passes, long enough not to crowd the node events.
const RESYNC: Duration = Duration::from_secs(2);

const SERVED_ELSEWHERE_METRIC: &str = "service_controller_loadbalancer_served_elsewhere";

/// The local provider's pool in the served-elsewhere test (no other test uses it).
const POOL: &str = "10.77.0.0/24";
const POOL_PREFIX: &str = "10.77.0.";

/// How many Services in the whole (shared) cluster a controller with a fresh local provider on
/// [`POOL`], serving class-less Services, must refuse: class-less, showing addresses not from
/// our pool, and either a LoadBalancer not being deleted or holding the (shared) finalizer.
/// Other tests leave such Services behind in their namespaces, so the gauge is compared with
/// this count rather than with this test's two.
async fn refusable(client: &kube::Client) -> Result<i64> {
    let all = Api::<Service>::all(client.clone())
        .list(&Default::default())
        .await?;
    Ok(all
        .items
        .iter()
        .filter(|s| {
            let spec = s.spec.as_ref();
            let class_less = spec.is_some_and(|sp| sp.load_balancer_class.is_none());
            let lb = spec.and_then(|sp| sp.type_.as_deref()) == Some("LoadBalancer");
            let deleting = s.metadata.deletion_timestamp.is_some();
            let addrs = ips(s);
            let theirs = !addrs.is_empty() && !addrs.iter().all(|ip| ip.starts_with(POOL_PREFIX))
                || hostname(s).is_some();
            class_less && theirs && ((lb && !deleting) || has_finalizer(s))
        })
        .count() as i64)
}

/// Waits until the gauge counts exactly the refusable Services (at least this test's `min`).
async fn wait_gauge(client: &kube::Client, ctrl: &Ctrl, min: i64) -> Result<()> {
    wait_for(
        "served-elsewhere gauge counts the refused Services",
        T,
        || async {
            let want = refusable(client).await.ok()?;
            let got = ctrl.count(SERVED_ELSEWHERE_METRIC) as i64;
            (want >= min && got == want).then_some(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_load_balancer_deleted_out_of_band_is_recreated() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-repair").await?;
    let class = "test.example.com/repair";
    let ctrl = Ctrl::start_every(&client, aws.config(class, false), aws.provider(), RESYNC);
    node(&client, "repair-a").await?;

    create(
        &client,
        &lb_service(&ns, "web", Some(class), &[("http", 80, "TCP", None)]),
    )
    .await?;
    let svc = wait_status(&client, &ns, "web").await?;
    let lb = aws
        .lb_of(&svc)
        .await
        .ok_or_else(|| anyhow!("no load balancer"))?;
    let old_arn = lb.load_balancer_arn().unwrap_or_default().to_string();
    assert_eq!(hostname(&svc).as_deref(), lb.dns_name());

    // Someone deletes the NLB behind the controller's back (console, a script, a cleanup job).
    aws.elb
        .delete_load_balancer()
        .load_balancer_arn(&old_arn)
        .send()
        .await?;
    assert!(aws.lb_of(&svc).await.is_none(), "deleted in moto");

    // Nothing about the Service or the nodes changes: only the periodic pass can notice.
    let new = wait_for("a new load balancer", T, || async {
        aws.lb_of(&svc)
            .await
            .filter(|l| l.load_balancer_arn() != Some(old_arn.as_str()))
    })
    .await?;
    // The load balancer shows in the cloud before its listener and target group are made.
    let arn = new.load_balancer_arn().unwrap_or_default().to_string();
    wait_for("the listener and target group recreated", T, || async {
        (aws.listeners(&arn).await.len() == 1 && aws.tgs_of(&arn).await.len() == 1).then_some(())
    })
    .await?;
    // moto derives the DNS name from the load balancer's name alone, so the recreated one has
    // the old name: what can be checked is that the status still names it.
    let new_dns = new.dns_name().unwrap_or_default().to_string();
    let svc = wait_for("the status names the new load balancer", T, || async {
        get(&client, &ns, "web")
            .await
            .filter(|s| hostname(s).as_deref() == Some(new_dns.as_str()))
    })
    .await?;
    assert!(has_finalizer(&svc));
    let note = wait_event(
        &client,
        &ns,
        "web",
        "RecreatingLoadBalancer",
        "no longer exists",
    )
    .await?;
    assert!(note.contains("recreating"), "{note}");
    let dangling = dangling_load_balancer_status(&aws.elb, &client, &ns).await?;
    assert!(
        dangling.is_empty(),
        "status of a missing load balancer: {dangling:?}"
    );
    ctrl.stop().await;
    Ok(())
}

/// Writes `ip` into the Service's status as another controller would.
async fn publish_as_someone_else(
    client: &kube::Client,
    ns: &str,
    name: &str,
    ip: &str,
) -> Result<()> {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    let p = serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&p))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_class_less_service_served_by_another_controller_is_left_alone() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    node(&client, "elsewhere-a").await?;
    // The cluster's own cloud-controller-manager already serves these two (it uses the same
    // finalizer name as we do; the second carries it).
    create(
        &client,
        &lb_service(&ns, "theirs", None, &[("http", 80, "TCP", None)]),
    )
    .await?;
    publish_as_someone_else(&client, &ns, "theirs", "203.0.113.7").await?;
    let mut finalized = lb_service(&ns, "theirs-fin", None, &[("http", 80, "TCP", None)]);
    finalized.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
    create(&client, &finalized).await?;
    publish_as_someone_else(&client, &ns, "theirs-fin", "203.0.113.8").await?;
    // And one nobody serves yet: ours, as the default implementation.
    create(
        &client,
        &lb_service(&ns, "ours", None, &[("http", 80, "TCP", None)]),
    )
    .await?;

    let config = || CloudLbConfig {
        default_load_balancer: true,
        load_balancer_class: None,
        ..local_config("it-elsewhere", "unused")
    };
    let ctrl = Ctrl::start(&client, config(), local_pool(POOL));
    let ours = wait_status(&client, &ns, "ours").await?;
    assert_eq!(ips(&ours).len(), 1, "ours is served");
    for (name, ip) in [("theirs", "203.0.113.7"), ("theirs-fin", "203.0.113.8")] {
        let note = wait_event(&client, &ns, name, SERVED_ELSEWHERE, "another controller").await?;
        assert!(note.contains("--default-load-balancer=false"), "{note}");
        let s = get(&client, &ns, name)
            .await
            .ok_or_else(|| anyhow!("gone"))?;
        assert_eq!(ips(&s), vec![ip.to_string()], "{name}: status untouched");
    }
    wait_gauge(&client, &ctrl, 2).await?;
    let theirs = get(&client, &ns, "theirs")
        .await
        .ok_or_else(|| anyhow!("gone"))?;
    assert!(!has_finalizer(&theirs), "no finalizer added to theirs");
    assert!(
        events(&client, &ns, "theirs", "EnsuringLoadBalancer")
            .await
            .is_empty()
    );
    assert!(
        events(&client, &ns, "theirs-fin", "EnsuringLoadBalancer")
            .await
            .is_empty()
    );

    // Deleting theirs: their finalizer (same name as ours) is theirs to remove, not ours.
    Api::<Service>::namespaced(client.clone(), &ns)
        .delete("theirs-fin", &Default::default())
        .await?;
    // A restart adopts what we served (our pool's address, our finalizer) without a Warning.
    ctrl.stop().await;
    let ctrl = Ctrl::start(&client, config(), local_pool(POOL));
    wait_gauge(&client, &ctrl, 2).await?;
    // The gauge can be right before ours had its turn: what follows says nothing happened
    // to ours, so let every listed Service be reconciled first.
    ctrl.wait_idle().await?;
    let fin = get(&client, &ns, "theirs-fin")
        .await
        .ok_or_else(|| anyhow!("gone"))?;
    assert!(
        has_finalizer(&fin),
        "their finalizer stays on a deleting Service"
    );
    assert_eq!(ips(&fin), vec!["203.0.113.8".to_string()]);
    let again = get(&client, &ns, "ours")
        .await
        .ok_or_else(|| anyhow!("gone"))?;
    assert_eq!(ips(&again), ips(&ours), "ours keeps its address");
    assert!(
        events(&client, &ns, "ours", SERVED_ELSEWHERE)
            .await
            .is_empty()
    );
    assert!(has_finalizer(&again));
    ctrl.stop().await;

    // Let the namespace go: play the other controller's part.
    patch(
        &client,
        &ns,
        "theirs-fin",
        serde_json::json!({"metadata": {"finalizers": null}}),
    )
    .await?;
    Ok(())
}

/// Deletion protection on the load balancer (AWS answers `OperationNotPermitted`; moto does
/// not enforce the attribute, so the fault proxy answers as AWS would) while its Service is
/// deleted: the finalizer holds and nothing is leaked; once protection is off the next retry
/// finishes the cleanup and the Service goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deletion_protection_holds_the_service_until_it_is_turned_off() -> Result<()> {
    let _g = SERIAL.lock().await;
    count_panics();
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-protect").await?;
    let class = "test.example.com/protect";
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    node(&client, "protect-a").await?;
    create(
        &client,
        &lb_service(&ns, "web", Some(class), &[("http", 80, "TCP", None)]),
    )
    .await?;
    let svc = wait_status(&client, &ns, "web").await?;
    let arn = aws
        .lb_of(&svc)
        .await
        .and_then(|l| l.load_balancer_arn().map(str::to_string))
        .ok_or_else(|| anyhow!("no load balancer"))?;

    // Protection on: the next two deletions are refused.
    aws.proxy.inject(Fault::code(
        Some("DeleteLoadBalancer"),
        400,
        "OperationNotPermitted",
        2,
    ));
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    let started = std::time::Instant::now();
    api.delete("web", &Default::default()).await?;
    wait_for("both refused deletions", T, || async {
        (aws.proxy
            .counts()
            .get("DeleteLoadBalancer")
            .copied()
            .unwrap_or(0)
            >= 2)
            .then_some(())
    })
    .await?;
    let held = get(&client, &ns, "web")
        .await
        .ok_or_else(|| anyhow!("the Service went while its load balancer stayed"))?;
    assert!(has_finalizer(&held), "the finalizer holds the Service");
    assert!(
        aws.elb
            .describe_load_balancers()
            .load_balancer_arns(&arn)
            .send()
            .await
            .is_ok(),
        "the protected load balancer is still there"
    );

    // Protection off (the faults are spent): the retry deletes it and releases the Service.
    wait_for("the Service gone", Duration::from_secs(90), || async {
        get(&client, &ns, "web").await.is_none().then_some(())
    })
    .await?;
    let converged_in = started.elapsed();
    let leaked = leaked_cloud_resources(&aws.elb, &aws.cluster, &client).await?;
    let doubles = double_allocations(&client).await?;
    report(&Row {
        scenario: "deletion protection on a deleted Service's load balancer, then off",
        faults: aws.proxy.injected(),
        converged_in,
        slices_differ: None,
        doubles: doubles.len(),
        leaked: Some(leaked.len()),
        panics: panics(),
    });
    assert!(leaked.is_empty(), "leaked: {leaked:?}");
    assert!(doubles.is_empty(), "allocated twice: {doubles:?}");
    assert_eq!(panics(), 0, "a panic in this process");
    ctrl.stop().await;
    Ok(())
}

//! Which Services are served, crashes, permanent and transient errors, foreign resources, out-of-band deletions and the node-sync metric.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Result, anyhow};
use cloud_lb::LoadBalancerProvider;
use cloud_lb::aws::elbv2_sdk as elbv2;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use test_support::moto::{Fault, FaultKind, is_mutating};
use test_support::wait_for;

use crate::aws::*;
use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn class_filtering_and_type_change() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-class").await?;
    let ours = "test.example.com/ours";
    node(&client, "cls-a").await?;
    // Only our class; not the default implementation.
    let ctrl = Ctrl::start(&client, aws.config(ours, false), aws.provider());
    create(
        &client,
        &lb_service(
            &ns,
            "foreign",
            Some("other.example.com/lb"),
            &[("http", 80, "TCP", None)],
        ),
    )
    .await?;
    create(
        &client,
        &lb_service(&ns, "classless", None, &[("http", 80, "TCP", None)]),
    )
    .await?;
    // external before mine: the watch delivers them in order and the queue hands them out in
    // order, so once mine is served external has been taken up too; idle, it is done. (Waiting
    // for two finished reconciles could be met by mine's own: its finalizer and status writes
    // queue it again.)
    let mut external = lb_service(&ns, "external", Some(ours), &[("http", 80, "TCP", None)]);
    external.metadata.annotations = Some(
        [(
            "service.beta.kubernetes.io/aws-load-balancer-type".to_string(),
            "external".to_string(),
        )]
        .into(),
    );
    create(&client, &external).await?;
    create(
        &client,
        &lb_service(&ns, "mine", Some(ours), &[("http", 80, "TCP", None)]),
    )
    .await?;
    let mine = wait_status(&client, &ns, "mine").await?;
    ctrl.wait_idle().await?;
    assert!(ctrl.reconciles_done() >= 2, "mine and external reconciled");
    // Our class, but the AWS Load Balancer Controller's type: implemented elsewhere.
    for name in ["foreign", "classless", "external"] {
        let s = get(&client, &ns, name)
            .await
            .ok_or_else(|| anyhow!("{name} missing"))?;
        assert!(!has_finalizer(&s), "{name} must not be touched");
        assert!(hostname(&s).is_none());
        assert!(aws.lb_of(&s).await.is_none());
    }
    ctrl.stop().await;

    // As the default implementation, class-less Services are ours too; foreign ones still not.
    let ctrl = Ctrl::start(&client, aws.config(ours, true), aws.provider());
    wait_status(&client, &ns, "classless").await?;
    let foreign = get(&client, &ns, "foreign")
        .await
        .ok_or_else(|| anyhow!("foreign missing"))?;
    assert!(!has_finalizer(&foreign));

    // Type change away from LoadBalancer: load balancer deleted, status cleared, finalizer gone.
    patch(
        &client,
        &ns,
        "mine",
        serde_json::json!({"spec": {"type": "ClusterIP"}}),
    )
    .await?;
    let s = wait_for("mine cleaned up", T, || async {
        get(&client, &ns, "mine")
            .await
            .filter(|s| !has_finalizer(s) && hostname(s).is_none())
    })
    .await?;
    assert!(aws.lb_of(&mine).await.is_none());
    assert!(aws.tagged(&ns, "mine").await?.is_empty());
    assert_eq!(
        s.spec.as_ref().and_then(|s| s.type_.as_deref()),
        Some("ClusterIP")
    );
    wait_event(&client, &ns, "mine", "DeletedLoadBalancer", "").await?;
    wait_event(&client, &ns, "mine", "DeletingLoadBalancer", "").await?;
    ctrl.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_mid_create_then_restart_adopts() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-crash").await?;
    let class = "test.example.com/crash";
    node(&client, "crash-a").await?;
    // CreateLoadBalancer reaches moto (the load balancer exists) but the answer never comes.
    aws.proxy.inject(Fault {
        action: Some("CreateLoadBalancer".into()),
        kind: FaultKind::ForwardThenHang,
        times: 1,
    });
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    let svc = create(
        &client,
        &lb_service(&ns, "crashy", Some(class), &[("http", 80, "TCP", None)]),
    )
    .await?;
    let name = cloud_lb::aws::spec::load_balancer_name(&aws.cluster, &svc);
    wait_for("half-created load balancer", T, || async {
        (!aws.lbs_named(&name).await.is_empty()).then_some(())
    })
    .await?;
    ctrl.crash();

    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    let svc = wait_status(&client, &ns, "crashy").await?;
    let lbs = aws.lbs_named(&name).await;
    assert_eq!(
        lbs.len(),
        1,
        "adopted, not duplicated (moto would duplicate on a second create)"
    );
    assert_eq!(hostname(&svc).as_deref(), lbs[0].dns_name());
    assert_eq!(aws.proxy.counts().get("CreateLoadBalancer"), Some(&1));
    let tgs = aws
        .tgs_of(lbs[0].load_balancer_arn().unwrap_or_default())
        .await;
    assert_eq!(tgs.len(), 1);
    ctrl.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_annotation_event_without_api_call_then_fixed() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-bad").await?;
    let class = "test.example.com/bad";
    node(&client, "bad-a").await?;
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    // The inventory sweep lists the cloud once at the start of the term; from here on, count
    // only what the invalid Service causes.
    wait_for("the first inventory sweep", T, || async {
        (ctrl.inventory_sweeps() >= 1).then_some(())
    })
    .await?;
    aws.proxy.reset_counts();
    let mut s = lb_service(&ns, "bad", Some(class), &[("http", 80, "TCP", None)]);
    s.metadata.annotations = Some(
        [(
            "service.beta.kubernetes.io/aws-load-balancer-scheme".to_string(),
            "public".to_string(),
        )]
        .into(),
    );
    create(&client, &s).await?;
    let note = wait_event(
        &client,
        &ns,
        "bad",
        "SyncLoadBalancerFailed",
        "aws-load-balancer-scheme",
    )
    .await?;
    assert!(note.contains("public"), "{note}");
    assert!(
        aws.proxy.counts().is_empty(),
        "no ELBv2 call for an invalid Service: {:?}",
        aws.proxy.counts()
    );
    // No retry until the Service changes.
    let done = ctrl.reconciles_done();
    assert!(
        events(&client, &ns, "bad", "SyncLoadBalancerFailed")
            .await
            .len()
            == 1
    );
    // Fixing the annotation converges.
    patch(&client, &ns, "bad", serde_json::json!({"metadata": {"annotations": {"service.beta.kubernetes.io/aws-load-balancer-scheme": "internal"}}})).await?;
    let svc = wait_status(&client, &ns, "bad").await?;
    wait_for("the fixing reconcile to finish", T, || async {
        (ctrl.reconciles_done() > done).then_some(())
    })
    .await?;
    let lb = aws.lb_of(&svc).await.ok_or_else(|| anyhow!("no lb"))?;
    assert_eq!(lb.scheme().map(|s| s.as_str()), Some("internal"));
    ctrl.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn throttling_and_5xx_converge_and_steady_state_is_quiet() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-faults").await?;
    let class = "test.example.com/faults";
    node(&client, "f-a").await?;
    node(&client, "f-b").await?;
    aws.proxy
        // The SDK never retries a create: every one of these reaches the controller's backoff.
        .inject(Fault::throttle(Some("CreateLoadBalancer"), 4));
    aws.proxy
        .inject(Fault::unavailable(Some("CreateTargetGroup"), 2));
    aws.proxy
        .inject(Fault::throttle(Some("RegisterTargets"), 1));
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    for n in ["s1", "s2", "s3"] {
        create(
            &client,
            &lb_service(&ns, n, Some(class), &[("http", 80, "TCP", None)]),
        )
        .await?;
    }
    let deadline = Duration::from_secs(120);
    for n in ["s1", "s2", "s3"] {
        wait_for(
            &format!("{n} converges despite faults"),
            deadline,
            || async { get(&client, &ns, n).await.filter(|s| hostname(s).is_some()) },
        )
        .await?;
    }
    assert_eq!(aws.proxy.injected(), 7, "every scripted fault was served");
    let failed: usize = {
        let mut n = 0;
        for s in ["s1", "s2", "s3"] {
            n += events(&client, &ns, s, "SyncLoadBalancerFailed")
                .await
                .len();
        }
        n
    };
    assert!(
        failed >= 1,
        "faults beyond the SDK's own retries reach the controller"
    );
    for n in ["s1", "s2", "s3"] {
        let s = get(&client, &ns, n).await.ok_or_else(|| anyhow!("gone"))?;
        assert_eq!(
            aws.lbs_named(&cloud_lb::aws::spec::load_balancer_name(&aws.cluster, &s))
                .await
                .len(),
            1
        );
    }
    ctrl.stop().await;

    // Steady state: a fresh controller re-ensures everything and changes nothing.
    aws.proxy.reset_counts();
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    // The inventory sweep at the start of the term lists every load balancer once too: wait
    // for it, so the counts below do not depend on whether it finished before the ensures.
    wait_for("3 ensures, 1 sweep", T, || async {
        (ctrl.reconciles_done() >= 3
            && ctrl.inventory_sweeps() >= 1
            && aws
                .proxy
                .counts()
                .get("DescribeListeners")
                .copied()
                .unwrap_or(0)
                >= 3)
            .then_some(())
    })
    .await?;
    // Read once nothing is in flight: a reconcile past its listeners could still add calls.
    ctrl.wait_idle().await?;
    let c = aws.proxy.counts();
    let mutating: BTreeMap<_, _> = c.iter().filter(|(k, _)| is_mutating(k)).collect();
    assert!(
        mutating.is_empty(),
        "mutating calls at steady state: {mutating:?}"
    );
    // Each ensure ends with DescribeListeners; the three load balancer lookups may share
    // one batched DescribeLoadBalancers, and the sweep lists them all in one page.
    assert_eq!(c.get("DescribeListeners"), Some(&3), "{c:?}");
    assert!(
        c.get("DescribeLoadBalancers")
            .is_some_and(|n| (2..=4).contains(n)),
        "{c:?}"
    );
    eprintln!("steady-state calls for 3 Services: {c:?}");
    ctrl.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn foreign_load_balancer_with_our_name_is_never_touched() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-foreign").await?;
    let class = "test.example.com/foreign";
    node(&client, "for-a").await?;
    // The Service exists before the controller, so its name (from its UID) is known.
    let svc = create(
        &client,
        &lb_service(&ns, "taken", Some(class), &[("http", 80, "TCP", None)]),
    )
    .await?;
    let name = cloud_lb::aws::spec::load_balancer_name(&aws.cluster, &svc);
    // Someone else's load balancer with that name (no ownership tags).
    aws.elb
        .create_load_balancer()
        .name(&name)
        .r#type(elbv2::types::LoadBalancerTypeEnum::Network)
        .subnets(&aws.subnets[0])
        .tags(
            elbv2::types::Tag::builder()
                .key("owner")
                .value("someone-else")
                .build(),
        )
        .send()
        .await?;
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    let note = wait_event(
        &client,
        &ns,
        "taken",
        "SyncLoadBalancerFailed",
        "not tagged as owned",
    )
    .await?;
    assert!(note.contains(&name), "{note}");
    let c = aws.proxy.counts();
    let mutating: BTreeMap<_, _> = c.iter().filter(|(k, _)| is_mutating(k)).collect();
    assert!(
        mutating.is_empty(),
        "touched a foreign load balancer: {c:?}"
    );
    assert_eq!(aws.lbs_named(&name).await.len(), 1);

    // Deleting the Service does not delete the foreign load balancer either.
    Api::<Service>::namespaced(client.clone(), &ns)
        .delete("taken", &DeleteParams::default())
        .await?;
    let note = wait_event(
        &client,
        &ns,
        "taken",
        "SyncLoadBalancerFailed",
        "before cleanup",
    )
    .await?;
    assert!(note.contains("not tagged as owned"), "{note}");
    let c = aws.proxy.counts();
    assert!(!c.contains_key("DeleteLoadBalancer"), "{c:?}");
    assert_eq!(aws.lbs_named(&name).await.len(), 1);
    // Release the Service for the next tests: drop our finalizer by hand.
    ctrl.stop().await;
    Api::<Service>::namespaced(client.clone(), &ns)
        .patch(
            "taken",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"metadata": {"finalizers": null}})),
        )
        .await
        .ok();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn host_update_recovers_from_resources_deleted_out_of_band() -> Result<()> {
    let _g = SERIAL.lock().await;
    let aws = Aws::start("it-stale").await?;
    let provider = aws.provider();
    let mut svc = lb_service("ns", "stale", None, &[("http", 80, "TCP", Some(30080))]);
    svc.metadata.uid = Some("uid-stale".into());
    let n = |name: &str| Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::core::v1::NodeSpec {
            provider_id: Some(format!("aws:///us-east-1a/{}", instance(name))),
            ..Default::default()
        }),
        status: None,
    };
    provider.ensure("it-stale", &svc, &[n("s-a")]).await?;
    let lb = aws.lb_of(&svc).await.ok_or_else(|| anyhow!("no lb"))?;
    let lb_arn = lb.load_balancer_arn().unwrap_or_default().to_string();
    let tg_arn = aws.tgs_of(&lb_arn).await[0]
        .target_group_arn()
        .unwrap_or_default()
        .to_string();
    // Someone deletes everything behind our back.
    aws.elb
        .delete_load_balancer()
        .load_balancer_arn(&lb_arn)
        .send()
        .await?;
    aws.elb
        .delete_target_group()
        .target_group_arn(&tg_arn)
        .send()
        .await?;
    // The remembered group is gone: the host update notices, looks up again, finds nothing
    // to update, and succeeds; the next ensure recreates everything.
    provider
        .update_hosts("it-stale", &svc, &[n("s-a"), n("s-b")])
        .await?;
    provider
        .ensure("it-stale", &svc, &[n("s-a"), n("s-b")])
        .await?;
    let lb = aws
        .lb_of(&svc)
        .await
        .ok_or_else(|| anyhow!("not recreated"))?;
    let tg = aws.tgs_of(lb.load_balancer_arn().unwrap_or_default()).await;
    assert_eq!(tg.len(), 1);
    let want: BTreeSet<_> = ["s-a", "s-b"]
        .iter()
        .map(|x| (instance(x), 30080))
        .collect();
    assert_eq!(
        aws.targets(tg[0].target_group_arn().unwrap_or_default())
            .await,
        want
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_sync_latency_is_one_observation_per_pass() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-pass").await?;
    let class = "test.example.com/pass";
    node(&client, "pass-a").await?;
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    let names = ["p1", "p2", "p3"];
    for n in names {
        create(
            &client,
            &lb_service(&ns, n, Some(class), &[("http", 80, "TCP", None)]),
        )
        .await?;
    }
    for n in names {
        wait_status(&client, &ns, n).await?;
    }
    let passes = "service_controller_nodesync_latency_seconds_count";
    let hosts = "service_controller_update_loadbalancer_host_latency_seconds_count";
    let (p0, h0) = (ctrl.count(passes), ctrl.count(hosts));
    node(&client, "pass-b").await?;
    wait_for(
        "every load balancer updated with the new host",
        T,
        || async { (ctrl.count(hosts) >= h0 + 3).then_some(()) },
    )
    .await?;
    wait_for("the pass to be observed", T, || async {
        (ctrl.count(passes) > p0).then_some(())
    })
    .await?;
    // One node event: one pass over three Services, observed once (upstream measures the
    // whole pass), while each Service's host update is observed on its own. (The start-up
    // pass may still finish inside this window, so "fewer than hosts", not "exactly one".)
    let (dp, dh) = (ctrl.count(passes) - p0, ctrl.count(hosts) - h0);
    assert_eq!(dh, 3);
    assert!(dp >= 1 && dp < dh, "passes {dp}, host updates {dh}");
    ctrl.stop().await;
    Ok(())
}

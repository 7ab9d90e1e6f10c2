//! Adoption of an existing NLB with make-before-break (issue 13), against moto: a load balancer
//! the test makes with its own listener and target group is taken over by a Service, and a
//! probe checks throughout that it always has a listener forwarding to a group with a
//! registered target. moto reports a registered instance target `healthy` at once unless the
//! instance is stopped (then `unused`; and a stopped instance cannot be registered, as in
//! AWS), so the test stops the nodes' instances once our targets are registered, which holds
//! the switch back, then starts them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Result, anyhow};
use cloud_lb::aws::elbv2_sdk as elbv2;
use elbv2::types::{
    Action, ActionTypeEnum, LoadBalancerSchemeEnum, LoadBalancerTypeEnum, ProtocolEnum, Tag,
    TargetDescription, TargetTypeEnum,
};
use kube::api::{Api, DeleteParams};
use test_support::moto::Fault;
use test_support::wait_for;

use crate::aws::*;
use crate::conditions::wait_reason;
use crate::harness::*;

const ADOPT: &str = "service-controller-manager.io/adopt-load-balancer";

/// A load balancer as another controller would leave it: `type`, a target group on `node_port`
/// with `targets`, a TCP listener on 80; `tags` on the load balancer. Its ARN, DNS name and the
/// group's ARN.
async fn foreign_lb(
    aws: &Aws,
    name: &str,
    kind: LoadBalancerTypeEnum,
    tags: &[(&str, &str)],
    targets: &[String],
) -> Result<(String, String, String)> {
    let mut req = aws
        .elb
        .create_load_balancer()
        .name(name)
        .r#type(kind.clone())
        .scheme(LoadBalancerSchemeEnum::InternetFacing)
        .subnets(&aws.subnets[0]);
    for (k, v) in tags {
        req = req.tags(Tag::builder().key(*k).value(*v).build());
    }
    let lb = req.send().await?;
    let lb = lb
        .load_balancers()
        .first()
        .ok_or_else(|| anyhow!("no load balancer"))?;
    let arn = lb.load_balancer_arn().unwrap_or_default().to_string();
    let dns = lb.dns_name().unwrap_or_default().to_string();
    let vpc = aws.vpc_of_subnet(&aws.subnets[0]).await?;
    // An application load balancer forwards HTTP.
    let protocol = if kind == LoadBalancerTypeEnum::Application {
        ProtocolEnum::Http
    } else {
        ProtocolEnum::Tcp
    };
    let tg = aws
        .elb
        .create_target_group()
        .name(format!("{name}-tg"))
        .protocol(protocol.clone())
        .port(31999)
        .vpc_id(vpc)
        .target_type(TargetTypeEnum::Instance)
        .send()
        .await?;
    let tg = tg
        .target_groups()
        .first()
        .and_then(|t| t.target_group_arn())
        .ok_or_else(|| anyhow!("no target group"))?
        .to_string();
    if !targets.is_empty() {
        let mut r = aws.elb.register_targets().target_group_arn(&tg);
        for t in targets {
            r = r.targets(TargetDescription::builder().id(t).port(31999).build());
        }
        r.send().await?;
    }
    aws.elb
        .create_listener()
        .load_balancer_arn(&arn)
        .port(80)
        .protocol(protocol)
        .default_actions(
            Action::builder()
                .r#type(ActionTypeEnum::Forward)
                .target_group_arn(&tg)
                .build(),
        )
        .send()
        .await?;
    Ok((arn, dns, tg))
}

/// Whether some listener of `lb` forwards to a group with at least one registered target
/// (`None`: a call failed, no verdict).
async fn serves(elb: &elbv2::Client, lb: &str) -> Option<bool> {
    let listeners = elb
        .describe_listeners()
        .load_balancer_arn(lb)
        .send()
        .await
        .ok()?;
    for l in listeners.listeners() {
        let Some(tg) = l
            .default_actions()
            .first()
            .and_then(|a| a.target_group_arn())
        else {
            continue;
        };
        let health = elb
            .describe_target_health()
            .target_group_arn(tg)
            .send()
            .await
            .ok()?;
        if !health.target_health_descriptions().is_empty() {
            return Some(true);
        }
    }
    Some(false)
}

async fn tags_of(aws: &Aws, arn: &str) -> Vec<(String, String)> {
    aws.elb
        .describe_tags()
        .resource_arns(arn)
        .send()
        .await
        .map(|o| {
            o.tag_descriptions()
                .iter()
                .flat_map(|d| d.tags())
                .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adoption_switches_listeners_only_once_new_targets_are_healthy() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let cluster = "it-adopt";
    let aws = Aws::start(cluster).await?;
    let class = "test.example.com/adopt";
    let vpc = aws.vpc_of_subnet(&aws.subnets[0]).await?;
    let sg = aws
        .security_group(
            &vpc,
            "adopt-nodes",
            &[(&format!("kubernetes.io/cluster/{cluster}"), "owned")],
        )
        .await?;
    let mut ids = vec![];
    for n in ["adopt-a", "adopt-b"] {
        let id = aws.instance(&aws.subnets[0], &[&sg]).await?;
        node_on(&client, n, &id).await?;
        ids.push(id);
    }
    let (lb, dns, old_tg) = foreign_lb(
        &aws,
        "legacy-nlb",
        LoadBalancerTypeEnum::Network,
        &[("team", "web")],
        &ids,
    )
    .await?;
    // The probe: from now until the end, some listener always forwards to registered targets.
    let (stop, polls, gaps) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let probe = {
        let (elb, lb, stop, polls, gaps) = (
            aws.elb.clone(),
            lb.clone(),
            stop.clone(),
            polls.clone(),
            gaps.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if serves(&elb, &lb).await == Some(false) {
                    gaps.fetch_add(1, Ordering::SeqCst);
                }
                polls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
    };

    // No health read succeeds until the instances are stopped below (the first ensure reads
    // none: it only makes and registers our group), so no retry can switch before that.
    aws.proxy
        .inject(Fault::throttle(Some("DescribeTargetHealth"), 100_000));
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    let mut svc = lb_service(&ns, "web", Some(class), &[("http", 80, "TCP", None)]);
    svc.metadata.annotations = Some([(ADOPT.to_string(), lb.clone())].into());
    create(&client, &svc).await?;

    // Tagged ours, our group made and registered, the listener still on the old group.
    wait_event(
        &client,
        &ns,
        "web",
        "SyncLoadBalancerFailed",
        "waiting for the new targets",
    )
    .await?;
    // Unhealthy from now on (moto: `unused`); then health reads go through again.
    aws.ec2
        .stop_instances()
        .set_instance_ids(Some(ids.clone()))
        .send()
        .await?;
    aws.proxy.clear_faults();
    let tags = tags_of(&aws, &lb).await;
    assert!(
        tags.contains(&(format!("kubernetes.io/cluster/{cluster}"), "owned".into()))
            && tags.contains(&("kubernetes.io/service-name".into(), format!("{ns}/web"))),
        "tagged as ours: {tags:?}"
    );
    assert!(
        tags.contains(&("team".into(), "web".into())),
        "its own tags stay"
    );
    let health_reads = || {
        aws.proxy
            .counts()
            .get("DescribeTargetHealth")
            .copied()
            .unwrap_or(0)
    };
    let before = health_reads();
    wait_for("a retry that reads the new targets' health", T, || async {
        (health_reads() >= before + 2).then_some(())
    })
    .await?;
    assert_eq!(
        aws.listeners(&lb).await.get(&80).map(|(_, tg)| tg.clone()),
        Some(old_tg.clone()),
        "no switch while the new targets are not healthy"
    );
    assert_eq!(
        aws.proxy.counts().get("ModifyListener"),
        None,
        "no ModifyListener yet"
    );

    // The instances start: the next retry switches, then the old group goes.
    aws.ec2
        .start_instances()
        .set_instance_ids(Some(ids.clone()))
        .send()
        .await?;
    let new_tg = wait_for("listener 80 switched to our group", T, || async {
        let (_, tg) = aws.listeners(&lb).await.get(&80)?.clone();
        (tg != old_tg).then_some(tg)
    })
    .await?;
    wait_for("the old owner's target group deleted", T, || async {
        let r = aws
            .elb
            .describe_target_groups()
            .target_group_arns(&old_tg)
            .send()
            .await;
        r.is_err().then_some(())
    })
    .await?;
    let svc = wait_status(&client, &ns, "web").await?;
    assert_eq!(
        hostname(&svc).as_deref(),
        Some(dns.as_str()),
        "the DNS name is kept"
    );
    let np = node_port(&svc, 80);
    wait_targets(&aws, &new_tg, ids.iter().map(|i| (i.clone(), np)).collect()).await?;
    stop.store(true, Ordering::SeqCst);
    probe.await?;
    assert!(polls.load(Ordering::SeqCst) > 10, "the probe ran");
    assert_eq!(
        gaps.load(Ordering::SeqCst),
        0,
        "a moment without a listener forwarding to registered targets"
    );

    // Deleting the Service deletes the adopted load balancer: it is ours now.
    Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), &ns)
        .delete("web", &DeleteParams::default())
        .await?;
    wait_for("adopted load balancer deleted", T, || async {
        aws.lbs_named("legacy-nlb").await.is_empty().then_some(())
    })
    .await?;
    ctrl.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adoption_is_refused_for_another_cluster_or_a_non_network_load_balancer() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-adopt-refuse").await?;
    let class = "test.example.com/adopt-refuse";
    node(&client, "refuse-a").await?;
    let (foreign, _, foreign_tg) = foreign_lb(
        &aws,
        "other-cluster-nlb",
        LoadBalancerTypeEnum::Network,
        &[("kubernetes.io/cluster/someone-else", "owned")],
        &[],
    )
    .await?;
    let (alb, _, _) =
        foreign_lb(&aws, "an-alb", LoadBalancerTypeEnum::Application, &[], &[]).await?;
    let before_tags = tags_of(&aws, &foreign).await;
    let ctrl = Ctrl::start(&client, aws.config(class, false), aws.provider());
    for (svc_name, target, why) in [
        ("steal", foreign.as_str(), "tagged for another cluster"),
        ("alb", "an-alb", "not a network load balancer"),
    ] {
        let mut svc = lb_service(&ns, svc_name, Some(class), &[("http", 80, "TCP", None)]);
        svc.metadata.annotations = Some([(ADOPT.to_string(), target.to_string())].into());
        create(&client, &svc).await?;
        wait_event(&client, &ns, svc_name, "SyncLoadBalancerFailed", why).await?;
        // The refusal stands on the Service as a condition, not only in an Event that expires.
        let c = wait_reason(&client, &ns, svc_name, "False", "Conflicting").await?;
        assert!(c.message.contains(why), "{}", c.message);
    }
    assert_eq!(tags_of(&aws, &foreign).await, before_tags, "no tag added");
    assert_eq!(
        aws.listeners(&foreign)
            .await
            .get(&80)
            .map(|(_, tg)| tg.clone()),
        Some(foreign_tg),
        "its listener untouched"
    );
    let groups = aws.elb.describe_target_groups().send().await?;
    assert_eq!(
        groups.target_groups().len(),
        2,
        "no target group of ours was made"
    );
    assert_eq!(aws.listeners(&alb).await.len(), 1);
    // Asking for no adoption any more: the Service gets a load balancer of its own and the
    // condition clears.
    let api: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client.clone(), &ns);
    let unadopt = serde_json::json!({"metadata": {"annotations": {ADOPT: null}}});
    api.patch(
        "steal",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&unadopt),
    )
    .await?;
    wait_reason(&client, &ns, "steal", "True", "LoadBalancerProvisioned").await?;
    ctrl.stop().await;
    Ok(())
}

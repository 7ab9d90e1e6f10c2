//! RegisterTargets / DeregisterTargets in batches of at most 100 targets (cloud-provider-aws's
//! chunk size), with 250 nodes against moto. The ELBv2 client the provider uses records the
//! size of every (de)registration it sends, before serialization (an SDK interceptor), and the
//! fault proxy counts the calls moto received.

use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow};
use cloud_lb::aws::elbv2_sdk as elbv2;
use cloud_lb::aws::{
    AwsCloudConfig, AwsProvider, budget::Rate, budget::RateLimits, emulator_ec2_client,
};
use elbv2::config::interceptors::BeforeSerializationInterceptorContextRef;
use elbv2::config::{ConfigBag, Intercept};
use elbv2::error::BoxError;
use elbv2::operation::deregister_targets::DeregisterTargetsInput;
use elbv2::operation::register_targets::RegisterTargetsInput;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams};
use test_support::moto::REGION;
use test_support::wait_for;

use crate::aws::*;
use crate::harness::*;

const NODES: usize = 250;

/// (operation, targets) of every RegisterTargets and DeregisterTargets the client sent.
#[derive(Clone, Debug, Default)]
struct TargetCalls(Arc<Mutex<Vec<(&'static str, usize)>>>);

impl TargetCalls {
    fn take(&self) -> Vec<(&'static str, usize)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Intercept for TargetCalls {
    fn name(&self) -> &'static str {
        "TargetCalls"
    }

    fn read_before_execution(
        &self,
        ctx: &BeforeSerializationInterceptorContextRef<'_>,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let input = ctx.input();
        let call = if let Some(i) = input.downcast_ref::<RegisterTargetsInput>() {
            Some(("RegisterTargets", i.targets().len()))
        } else {
            input
                .downcast_ref::<DeregisterTargetsInput>()
                .map(|i| ("DeregisterTargets", i.targets().len()))
        };
        if let Some(c) = call {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(c);
        }
        Ok(())
    }
}

/// A provider whose ELBv2 client goes through the fault proxy with `interceptor` watching every
/// request it sends (its typed input, before serialization).
pub(crate) fn provider_seen_by(
    aws: &Aws,
    interceptor: impl Intercept + 'static,
) -> Arc<AwsProvider> {
    let conf = elbv2::Config::builder()
        .behavior_version(elbv2::config::BehaviorVersion::latest())
        .region(elbv2::config::Region::new(REGION.to_string()))
        .endpoint_url(&aws.proxy.endpoint)
        .credentials_provider(elbv2::config::Credentials::new(
            "test", "test", None, None, "static",
        ))
        .retry_config(elbv2::config::retry::RetryConfig::standard().with_max_attempts(2))
        .interceptor(interceptor)
        .build();
    let fast = Rate {
        qps: 1000.0,
        burst: 1000,
    };
    Arc::new(AwsProvider::with_clients(
        elbv2::Client::from_conf(conf),
        emulator_ec2_client(&aws.proxy.endpoint, REGION, 2),
        AwsCloudConfig {
            subnets: aws.subnets[..1].to_vec(),
            rate_limits: RateLimits::uniform(fast),
            ..Default::default()
        },
    ))
}

fn name(i: usize) -> String {
    format!("batch-{i:03}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn targets_are_registered_and_deregistered_100_at_a_time() -> Result<()> {
    let _g = SERIAL.lock().await;
    let (client, ns) = setup().await?;
    let aws = Aws::start("it-batches").await?;
    let class = "test.example.com/batches";
    for i in 0..NODES {
        node(&client, &name(i)).await?;
    }
    let calls = TargetCalls::default();
    let provider = provider_seen_by(&aws, calls.clone());
    let ctrl = Ctrl::start(&client, aws.config(class, false), provider.clone());

    create(
        &client,
        &lb_service(&ns, "big", Some(class), &[("http", 80, "TCP", None)]),
    )
    .await?;
    let svc = wait_status(&client, &ns, "big").await?;
    let np = node_port(&svc, 80);
    let lb = aws.lb_of(&svc).await.ok_or_else(|| anyhow!("no lb"))?;
    let tg = aws
        .tgs_of(lb.load_balancer_arn().unwrap_or_default())
        .await
        .into_iter()
        .next()
        .and_then(|t| t.target_group_arn().map(str::to_string))
        .ok_or_else(|| anyhow!("no target group"))?;
    let all = |r: std::ops::Range<usize>| -> std::collections::BTreeSet<(String, i32)> {
        r.map(|i| (instance(&name(i)), np)).collect()
    };
    wait_targets(&aws, &tg, all(0..NODES)).await?;
    // 250 targets in three calls of at most 100, and moto received exactly those three.
    let sent = calls.take();
    assert_eq!(
        sent,
        vec![
            ("RegisterTargets", 100),
            ("RegisterTargets", 100),
            ("RegisterTargets", 50)
        ]
    );
    assert_eq!(aws.proxy.counts().get("RegisterTargets"), Some(&3));
    ctrl.stop().await;

    // 130 nodes go while no controller runs; the next one deregisters them in one pass.
    let nodes: Api<Node> = Api::all(client.clone());
    for i in 0..130 {
        nodes.delete(&name(i), &DeleteParams::default()).await?;
    }
    wait_for("130 nodes gone", T, || async {
        (nodes.list(&Default::default()).await.ok()?.items.len() == NODES - 130).then_some(())
    })
    .await?;
    aws.proxy.reset_counts();
    let ctrl = Ctrl::start(&client, aws.config(class, false), provider);
    wait_targets(&aws, &tg, all(130..NODES)).await?;
    let sent = calls.take();
    assert_eq!(
        sent,
        vec![("DeregisterTargets", 100), ("DeregisterTargets", 30)]
    );
    assert_eq!(aws.proxy.counts().get("DeregisterTargets"), Some(&2));
    assert!(!aws.proxy.counts().contains_key("RegisterTargets"));
    ctrl.stop().await;
    Ok(())
}

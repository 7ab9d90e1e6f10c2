//! The whole cloud-lb controller (informers, queue, workers, status writes) against a real
//! local control plane and moto's real server, through the counting layer:
//!
//! 1. cold: 50 nodes, then 200 LoadBalancer Services, until every Service shows its address;
//!
//! The nodes' instance IDs are unknown to EC2, so the security-group pass describes but writes
//! no rule: 200 Services' rules on one group would exceed EC2's default quota of 60 inbound
//! rules per group, which moto enforces (tests/cloud_lb/ec2.rs covers the rules themselves).
//!
//! 2. steady-state resync: a restarted controller re-ensures all 200 (0 mutating calls);
//! 3. one node added, until every load balancer has registered it;
//! 4. one node removed, until every load balancer has deregistered it.
//!
//! Run: `cargo bench -p cloud-lb --bench controller --profile dev` (needs `bin/controlplane`).
//! Env: BENCH_SERVICES, BENCH_NODES, BENCH_CONCURRENCY (`--concurrent-service-syncs`, default
//! 10), BENCH_DEFAULT_BUDGET=1 to keep the production client-side ELBv2 budget (10/s
//! describe and mutate, 4/s targets) instead of an unlimited one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloud_lb::aws::budget::{Rate, RateLimits};
use cloud_lb::aws::{AwsCloudConfig, AwsProvider};
use cloud_lb::{CloudLbConfig, LoadBalancerProvider, ProviderKind, run_with_provider};
use k8s_openapi::api::core::v1::{Namespace, Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use scm_runtime::{ContextBase, LeaderGate, Metrics};
use test_support::moto::{FaultProxy, Moto, REGION, is_mutating};
use test_support::{ControlPlane, ControlPlaneOptions, NodeSpecBuilder, create_node, wait_for};
use tokio_util::sync::CancellationToken;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Ctrl {
    token: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    metrics: Metrics,
    _leader: tokio::sync::watch::Sender<bool>,
}

impl Ctrl {
    fn start(
        client: &kube::Client,
        config: CloudLbConfig,
        provider: Arc<dyn LoadBalancerProvider>,
    ) -> Ctrl {
        let (leader, tx) = LeaderGate::fixed(true);
        let base = ContextBase::new(client.clone(), leader);
        let (token, metrics) = (base.shutdown.clone(), base.metrics.clone());
        let ctx = base.context("cloud-lb", "service-controller");
        let task = tokio::spawn(async move {
            let _ = run_with_provider(ctx, config, provider).await;
        });
        Ctrl {
            token,
            task,
            metrics,
            _leader: tx,
        }
    }

    fn reconciles_done(&self) -> u64 {
        self.metrics
            .encode()
            .lines()
            .find(|l| l.starts_with("service_controller_manager_reconcile_duration_seconds_count"))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or(0)
    }

    /// Condition applies sent (`LoadBalancerReady`), counted by the controller.
    fn condition_writes(&self) -> u64 {
        self.metrics.condition_writes("cloud-lb")
    }

    async fn stop(self) {
        self.token.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

fn report(name: &str, elapsed: Duration, calls: &BTreeMap<String, u64>) {
    let total: u64 = calls.values().sum();
    let mutating: u64 = calls
        .iter()
        .filter(|(k, _)| is_mutating(k))
        .map(|(_, v)| v)
        .sum();
    println!(
        "\n## {name}: {:.2} s to converge, {total} ELBv2 and EC2 calls ({mutating} mutating)",
        elapsed.as_secs_f64()
    );
    for (op, n) in calls {
        println!("  {op:<34} {n:>6}");
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let n_services = env("BENCH_SERVICES", 200);
    let n_nodes = env("BENCH_NODES", 50);
    let concurrency = env("BENCH_CONCURRENCY", 10);
    let default_budget = env("BENCH_DEFAULT_BUDGET", 0) == 1;
    let cp = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let client = cp.client().await?;
    let moto = Moto::start().await?;
    let proxy = FaultProxy::start(&moto.addr).await?;
    let subnets = moto.default_subnets().await?;
    let limits = if default_budget {
        RateLimits::default()
    } else {
        let fast = Rate {
            qps: 10_000.0,
            burst: 10_000,
        };
        RateLimits::uniform(fast)
    };
    let provider = || -> Arc<dyn LoadBalancerProvider> {
        Arc::new(AwsProvider::for_emulator(
            &proxy.endpoint,
            REGION,
            3,
            AwsCloudConfig {
                subnets: subnets[..1].to_vec(),
                rate_limits: limits,
                ..Default::default()
            },
        ))
    };
    let config = CloudLbConfig {
        cloud_provider: ProviderKind::Aws,
        cloud_config: None,
        cluster_name: "bench".into(),
        concurrent_service_syncs: concurrency,
        load_balancer_class: None,
        default_load_balancer: true,
        ..CloudLbConfig::default()
    };
    let ns = "bench";
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
    for i in 0..n_nodes {
        create_node(
            &client,
            NodeSpecBuilder {
                name: format!("node-{i:03}"),
                provider_id: Some(format!("aws:///us-east-1a/i-{i:017x}")),
                ..Default::default()
            },
        )
        .await?;
    }
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let all_have_status = || async {
        let l = services.list(&ListParams::default()).await.ok()?;
        let done = l
            .items
            .iter()
            .filter(|s| {
                s.status
                    .as_ref()
                    .and_then(|st| st.load_balancer.as_ref())
                    .and_then(|lb| lb.ingress.as_ref())
                    .is_some_and(|i| !i.is_empty())
            })
            .count();
        (done == n_services).then_some(())
    };
    println!(
        "# cloud-lb controller + real control plane + moto: {n_services} Services x 1 port, {n_nodes} nodes, --concurrent-service-syncs={concurrency}, client budget {}",
        if default_budget {
            "production defaults"
        } else {
            "unlimited"
        }
    );

    // 1. Cold.
    let ctrl = Ctrl::start(&client, config.clone(), provider());
    let start = Instant::now();
    for i in 0..n_services {
        let svc = Service {
            metadata: ObjectMeta {
                name: Some(format!("svc-{i:03}")),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                selector: Some([("app".to_string(), format!("a{i}"))].into()),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        };
        services.create(&PostParams::default(), &svc).await?;
    }
    wait_for(
        "every Service has its load balancer",
        Duration::from_secs(1800),
        all_have_status,
    )
    .await?;
    report(
        &format!("cold: {n_services} Services created"),
        start.elapsed(),
        &proxy.counts(),
    );
    // The condition follows the status in the same reconcile: let every one land.
    wait_for(
        "every Service shows LoadBalancerReady=True",
        Duration::from_secs(600),
        || async {
            let l = services.list(&ListParams::default()).await.ok()?;
            l.items
                .iter()
                .all(|s| {
                    s.status
                        .as_ref()
                        .and_then(|st| st.conditions.as_ref())
                        .is_some_and(|c| {
                            c.iter()
                                .any(|c| c.type_ == "LoadBalancerReady" && c.status == "True")
                        })
                })
                .then_some(())
        },
    )
    .await?;
    println!("  Service condition writes {:>22}", ctrl.condition_writes());
    ctrl.stop().await;

    // 2. Steady-state resync: a new controller (empty memory) ensures everything again.
    proxy.reset_counts();
    let start = Instant::now();
    let ctrl = Ctrl::start(&client, config.clone(), provider());
    // Every full ensure ends with DescribeListeners; count those, not reconciles (a key can
    // be reconciled twice, the second time as a no-op).
    wait_for(
        "every Service re-ensured",
        Duration::from_secs(1800),
        || async {
            (proxy
                .counts()
                .get("DescribeListeners")
                .copied()
                .unwrap_or(0)
                >= n_services as u64
                && ctrl.reconciles_done() >= n_services as u64)
                .then_some(())
        },
    )
    .await?;
    report(
        "steady-state resync (restarted controller)",
        start.elapsed(),
        &proxy.counts(),
    );
    println!("  Service condition writes {:>22}", ctrl.condition_writes());
    let conditions_before = ctrl.condition_writes();

    // 3. One node added.
    proxy.reset_counts();
    let start = Instant::now();
    create_node(
        &client,
        NodeSpecBuilder {
            name: "node-new".into(),
            provider_id: Some(format!("aws:///us-east-1a/i-{:017x}", 999_999)),
            ..Default::default()
        },
    )
    .await?;
    wait_for(
        "every load balancer registered the node",
        Duration::from_secs(1800),
        || async {
            (proxy.counts().get("RegisterTargets").copied().unwrap_or(0) >= n_services as u64)
                .then_some(())
        },
    )
    .await?;
    report("one node added", start.elapsed(), &proxy.counts());
    println!(
        "  Service condition writes {:>22}",
        ctrl.condition_writes() - conditions_before
    );
    let conditions_before = ctrl.condition_writes();

    // 4. One node removed.
    proxy.reset_counts();
    let start = Instant::now();
    Api::<Node>::all(client.clone())
        .delete("node-000", &DeleteParams::default())
        .await?;
    wait_for(
        "every load balancer deregistered the node",
        Duration::from_secs(1800),
        || async {
            (proxy
                .counts()
                .get("DeregisterTargets")
                .copied()
                .unwrap_or(0)
                >= n_services as u64)
                .then_some(())
        },
    )
    .await?;
    report("one node removed", start.elapsed(), &proxy.counts());
    println!(
        "  Service condition writes {:>22}",
        ctrl.condition_writes() - conditions_before
    );
    ctrl.stop().await;
    cp.stop().await;
    Ok(())
}

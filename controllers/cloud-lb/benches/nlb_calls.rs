//! ELBv2 and EC2 calls by operation, and time to converge, for the AWS provider against moto's
//! real server (through the counting layer in front of it):
//!
//! 1. cold: 200 LoadBalancer Services over 50 nodes;
//! 2. steady-state resync: every Service ensured again (must make 0 mutating calls);
//! 3. periodic existence check: the controller's periodic pass asks `exist` once for every
//!    Service it remembers (to recreate load balancers deleted out of band; 0 mutating calls),
//!    and its fallback after a failure, a `get` per Service;
//! 4. the cloud inventory sweep's listing (`LoadBalancerProvider::inventory`: every load
//!    balancer and target group tagged for the cluster, and their security-group rules; 0
//!    mutating calls, and all 200 load balancers and groups found);
//! 5. one node added (host update of every Service);
//! 6. one node removed.
//!
//! The run fails if the steady-state resync, the existence check or the inventory pass make a
//! mutating call.
//!
//! Run: `cargo bench -p cloud-lb --bench nlb_calls` (env BENCH_SERVICES, BENCH_NODES,
//! BENCH_CONCURRENCY override the sizes). The provider is driven directly with
//! `--concurrent-service-syncs`-like concurrency; the Kubernetes side is not in the loop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloud_lb::aws::budget::{Rate, RateLimits};
use cloud_lb::aws::{AwsCloudConfig, AwsProvider};
use cloud_lb::{LoadBalancerProvider, core};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Node, NodeSpec, Service, ServicePort, ServiceSpec,
    ServiceStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use test_support::moto::{FaultProxy, Moto, REGION, is_mutating};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn node(i: usize) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(format!("node-{i:03}")),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            provider_id: Some(format!("aws:///us-east-1a/i-{i:017x}")),
            ..Default::default()
        }),
        status: None,
    }
}

fn service(i: usize) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i:03}")),
            namespace: Some("bench".into()),
            uid: Some(format!("00000000-0000-0000-0000-{i:012}")),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                node_port: Some(30000 + i as i32),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// The EC2 operations the provider uses (everything else the proxy counts is ELBv2).
fn is_ec2(op: &str) -> bool {
    matches!(
        op,
        "DescribeInstances"
            | "DescribeSubnets"
            | "DescribeRouteTables"
            | "DescribeSecurityGroups"
            | "AuthorizeSecurityGroupIngress"
            | "RevokeSecurityGroupIngress"
    )
}

struct Phase {
    name: &'static str,
    calls: BTreeMap<String, u64>,
    elapsed: Duration,
}

async fn phase<F, Fut>(proxy: &FaultProxy, name: &'static str, f: F) -> Phase
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    proxy.reset_counts();
    let start = Instant::now();
    let failures = f().await;
    let elapsed = start.elapsed();
    if failures > 0 {
        eprintln!("{name}: {failures} provider calls failed");
    }
    Phase {
        name,
        calls: proxy.counts(),
        elapsed,
    }
}

async fn for_all<F, Fut>(services: &[Service], concurrency: usize, f: F) -> usize
where
    F: Fn(Service) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    futures::stream::iter(services.iter().cloned().map(f))
        .buffer_unordered(concurrency)
        .filter(|ok| futures::future::ready(!ok))
        .count()
        .await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let n_services = env("BENCH_SERVICES", 200);
    let n_nodes = env("BENCH_NODES", 50);
    let concurrency = env("BENCH_CONCURRENCY", 10);
    let moto = Moto::start().await?;
    let proxy = FaultProxy::start(&moto.addr).await?;
    let subnets = moto.default_subnets().await?;
    let fast = Rate {
        qps: 10_000.0,
        burst: 10_000,
    };
    // The benchmark measures calls and the emulator's speed, not the client-side budget.
    let provider = Arc::new(AwsProvider::for_emulator(
        &proxy.endpoint,
        REGION,
        3,
        AwsCloudConfig {
            subnets: subnets[..1].to_vec(),
            rate_limits: RateLimits::uniform(fast),
            ..Default::default()
        },
    ));
    let cluster = "bench";
    let services: Vec<Service> = (0..n_services).map(service).collect();
    let mut nodes: Vec<Node> = (0..n_nodes).map(node).collect();
    let mut phases = vec![];

    let stable = core::stable_nodes(&nodes);
    phases.push(
        phase(&proxy, "cold create", || {
            for_all(&services, concurrency, |s| {
                let p = provider.clone();
                let n = stable.clone();
                async move { p.ensure(cluster, &s, &n).await.is_ok() }
            })
        })
        .await,
    );
    // What the controller would have published after the cold phase.
    let services: Vec<Service> = services
        .into_iter()
        .map(|mut s| {
            s.status = Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(vec![LoadBalancerIngress {
                        hostname: Some("published.example".into()),
                        ..Default::default()
                    }]),
                }),
                ..Default::default()
            });
            s
        })
        .collect();
    phases.push(
        phase(&proxy, "steady-state resync", || {
            for_all(&services, concurrency, |s| {
                let p = provider.clone();
                let n = stable.clone();
                async move { p.ensure(cluster, &s, &n).await.is_ok() }
            })
        })
        .await,
    );
    phases.push(
        phase(&proxy, "periodic existence check", || async {
            match provider.exist(cluster, &services).await {
                Ok(v) => v.iter().filter(|e| !**e).count(),
                Err(_) => services.len(),
            }
        })
        .await,
    );
    phases.push(
        phase(&proxy, "existence check fallback (get each)", || {
            for_all(&services, concurrency, |s| {
                let p = provider.clone();
                async move { matches!(p.get(cluster, &s).await, Ok(Some(_))) }
            })
        })
        .await,
    );
    let mut listed = (0, 0);
    phases.push(
        phase(&proxy, "inventory pass", || async {
            match provider.inventory(cluster).await {
                Ok(Some(inv)) => {
                    listed = (inv.lbs.len(), inv.tgs.len());
                    0
                }
                Ok(None) | Err(_) => 1,
            }
        })
        .await,
    );
    nodes.push(node(n_nodes));
    let stable = core::stable_nodes(&nodes);
    phases.push(
        phase(&proxy, "one node added", || {
            for_all(&services, concurrency, |s| {
                let p = provider.clone();
                let n = stable.clone();
                async move { p.update_hosts(cluster, &s, &n).await.is_ok() }
            })
        })
        .await,
    );
    nodes.remove(0);
    let stable = core::stable_nodes(&nodes);
    phases.push(
        phase(&proxy, "one node removed", || {
            for_all(&services, concurrency, |s| {
                let p = provider.clone();
                let n = stable.clone();
                async move { p.update_hosts(cluster, &s, &n).await.is_ok() }
            })
        })
        .await,
    );

    println!(
        "# cloud-lb AWS provider vs moto: {n_services} Services x 1 port, {n_nodes} nodes, concurrency {concurrency}"
    );
    for p in &phases {
        let sum = |ec2: bool, mutating: bool| -> u64 {
            p.calls
                .iter()
                .filter(|(k, _)| is_ec2(k) == ec2 && (!mutating || is_mutating(k)))
                .map(|(_, v)| v)
                .sum()
        };
        println!(
            "\n## {}: {:.2} s, {} ELBv2 calls ({} mutating), {} EC2 calls ({} mutating)",
            p.name,
            p.elapsed.as_secs_f64(),
            sum(false, false),
            sum(false, true),
            sum(true, false),
            sum(true, true),
        );
        for (op, n) in &p.calls {
            println!("  {op:<34} {n:>6}");
        }
    }
    println!(
        "\ninventory pass found {} load balancers and {} target groups",
        listed.0, listed.1
    );
    let read_only = [
        "steady-state resync",
        "periodic existence check",
        "inventory pass",
    ];
    for p in phases.iter().filter(|p| read_only.contains(&p.name)) {
        let mutating: u64 = p
            .calls
            .iter()
            .filter(|(k, _)| is_mutating(k))
            .map(|(_, v)| v)
            .sum();
        anyhow::ensure!(mutating == 0, "{}: {mutating} mutating calls", p.name);
    }
    Ok(())
}

//! ClusterIP, NodePort and ServiceCIDR controllers end to end.
//!
//! Against the real local control plane (a stock kube-apiserver, which allocates by itself):
//! mirroring without writes, out-of-range findings reported once, capacity metrics, the
//! ServiceCIDR finalizer/Ready/deletion blocking, and a restart rebuilding identical state.
//! The assign path needs an API server that leaves ClusterIPs and NodePorts empty; no real one
//! in reach does, so (as issue 4 allows) the harness's recording API double
//! ([`test_support::double`]) serves Services for it, including 409 handling, duplicate
//! detection and the exact calls a shell makes.
//!
//! Modules: [`mirror`] and [`ipaddress`] (stock API server: IPAddress findings, gauges equal to
//! the IPAddress count, a `10.0.0.0/8` range), [`condition`] (the `ClusterIPValid` condition),
//! [`service_cidr`], [`assign`] and [`calls`] (double).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::{ServiceCIDR, ServiceCIDRSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use scm_runtime::Metrics;
use test_support::{ControlPlane, ControlPlaneOptions, InProcess, double, wait_for};

const DEADLINE: Duration = Duration::from_secs(60);

/// A controller started through its crate's `run()` from its own in-process context base
/// ([`InProcess`], as the manager builds contexts).
struct Running {
    metrics: Metrics,
    procs: InProcess,
}

impl Running {
    fn start<F, Fut, E>(client: &Client, name: &str, reporter: &str, run: F) -> Running
    where
        F: FnOnce(scm_runtime::ControllerContext) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let procs = InProcess::new(client.clone());
        procs.start(name, reporter, run);
        Running {
            metrics: procs.base.metrics.clone(),
            procs,
        }
    }

    /// Stops it as SIGTERM would (drained, bounded).
    async fn stop(self) {
        if let Err(e) = self.procs.stop(Duration::from_secs(10)).await {
            eprintln!("stopping: {e}");
        }
    }

    /// Kills it: tasks aborted, nothing drained (as a crash would).
    fn kill(self) {
        drop(self.procs);
    }
}

/// `clusterip-alloc` as the manager runs it by default (without `--assign`).
fn start_clusterip(client: &Client, ranges: &[&str]) -> Running {
    clusterip(client, ranges, false)
}

/// `clusterip-alloc` with `--assign`, for an API that does not allocate (the double).
fn assigning_clusterip(client: &Client, ranges: &[&str]) -> Running {
    clusterip(client, ranges, true)
}

fn clusterip(client: &Client, ranges: &[&str], assign: bool) -> Running {
    let cfg = clusterip_alloc::ClusterIpAllocConfig {
        service_cluster_ip_range: ranges.iter().map(|r| r.parse().expect("cidr")).collect(),
        concurrent_syncs: 2,
        assign,
        ..Default::default()
    };
    Running::start(client, "clusterip-alloc", "clusterip-allocator", |ctx| {
        clusterip_alloc::run(ctx, cfg)
    })
}

/// `nodeport-alloc` as the manager runs it by default (without `--assign`).
fn start_nodeport(client: &Client, range: &str) -> Running {
    nodeport(client, range, false)
}

/// `nodeport-alloc` with `--assign`, for an API that does not allocate (the double).
fn assigning_nodeport(client: &Client, range: &str) -> Running {
    nodeport(client, range, true)
}

fn nodeport(client: &Client, range: &str, assign: bool) -> Running {
    let cfg = nodeport_alloc::NodePortAllocConfig {
        service_node_port_range: range.parse().expect("range"),
        concurrent_syncs: 2,
        assign,
    };
    Running::start(client, "nodeport-alloc", "nodeport-allocator", |ctx| {
        nodeport_alloc::run(ctx, cfg)
    })
}

fn start_service_cidr(client: &Client) -> Running {
    let cfg = clusterip_alloc::ServiceCidrConfig {
        concurrent_syncs: 2,
    };
    Running::start(client, "service-cidr", "service-cidr-controller", |ctx| {
        clusterip_alloc::run_service_cidr(ctx, cfg)
    })
}

/// The value of one sample line (`name{labels} value`) in Prometheus text.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|r| r.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

fn svc(name: &str, f: impl FnOnce(&mut ServiceSpec)) -> Service {
    let mut spec = ServiceSpec {
        selector: Some([("app".to_string(), name.to_string())].into()),
        ports: Some(vec![ServicePort {
            port: 80,
            ..Default::default()
        }]),
        ..Default::default()
    };
    f(&mut spec);
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// Every kind of Service a stock API server allocates for.
fn all_kinds() -> Vec<Service> {
    vec![
        svc("plain", |_| {}),
        svc("prefer-dual", |s| {
            s.ip_family_policy = Some("PreferDualStack".into())
        }),
        svc("headless", |s| s.cluster_ip = Some("None".into())),
        svc("headless-selectorless", |s| {
            s.cluster_ip = Some("None".into());
            s.selector = None;
        }),
        svc("nodeport", |s| s.type_ = Some("NodePort".into())),
        svc("lb-local", |s| {
            s.type_ = Some("LoadBalancer".into());
            s.external_traffic_policy = Some("Local".into());
        }),
        svc("lb-no-np", |s| {
            s.type_ = Some("LoadBalancer".into());
            s.allocate_load_balancer_node_ports = Some(false);
        }),
        svc("external", |s| {
            s.type_ = Some("ExternalName".into());
            s.external_name = Some("example.com".into());
            s.selector = None;
        }),
        svc("dns", |s| {
            s.type_ = Some("NodePort".into());
            s.ports = Some(vec![
                ServicePort {
                    name: Some("tcp".into()),
                    port: 53,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
                ServicePort {
                    name: Some("udp".into()),
                    port: 53,
                    protocol: Some("UDP".into()),
                    ..Default::default()
                },
            ]);
        }),
    ]
}

async fn events_for(client: &Client, ns: &str, name: &str, reason: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .collect()
}

/// Counts ClusterIPs and node ports the API server holds across all namespaces.
async fn cluster_usage(client: &Client) -> (usize, usize) {
    let (v4, v6, ports) = cluster_usage_by_family(client).await;
    (v4 + v6, ports)
}

/// Counts IPv4 ClusterIPs, IPv6 ClusterIPs and node ports across all namespaces.
async fn cluster_usage_by_family(client: &Client) -> (usize, usize, usize) {
    let all: Api<Service> = Api::all(client.clone());
    let list = all
        .list(&ListParams::default())
        .await
        .expect("list services");
    let (mut v4, mut v6) = (0, 0);
    let mut ports = BTreeSet::new();
    for s in &list.items {
        let spec = s.spec.as_ref().expect("spec");
        if spec.type_.as_deref() != Some("ExternalName") {
            for ip in spec.cluster_ips.iter().flatten().filter(|i| *i != "None") {
                if ip.contains(':') {
                    v6 += 1;
                } else {
                    v4 += 1;
                }
            }
        }
        for p in spec.ports.iter().flatten() {
            if let Some(np) = p.node_port {
                ports.insert(np);
            }
        }
        if let Some(h) = spec.health_check_node_port {
            ports.insert(h);
        }
    }
    (v4, v6, ports.len())
}

fn spec_of(s: &Service) -> &ServiceSpec {
    s.spec.as_ref().expect("spec")
}

// The crate root is tests/allocators.rs (as Cargo.toml names it), so its modules are found
// relative to tests/: point them at this test's own folder.
#[path = "allocators/assign.rs"]
mod assign;
#[path = "allocators/calls.rs"]
mod calls;
#[path = "allocators/condition.rs"]
mod condition;
#[path = "allocators/ipaddress.rs"]
mod ipaddress;
#[path = "allocators/mirror.rs"]
mod mirror;
#[path = "allocators/service_cidr.rs"]
mod service_cidr;

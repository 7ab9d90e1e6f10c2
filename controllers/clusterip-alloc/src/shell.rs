//! `clusterip-alloc` as an [`Allocator`] of the shared allocator shell
//! ([`scm_allocator::shell`]): addresses from the flag's ranges or the cluster's ServiceCIDRs
//! (whose informer also wakes the rebuild), the API server's IPAddress objects (the process's
//! one IPAddress informer: their findings, and the capacity counted from them), per-CIDR
//! capacity gauges, and assignments written into the Service's ClusterIP fields.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::api::networking::v1::{IPAddress, ServiceCIDR};
use kube::Resource;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use scm_allocator::Pending;
use scm_allocator::shell::{self, Allocator, MetricNames, MetricsOf, MirrorOf, Step};
use scm_runtime::{ControllerContext, Informer, ObjectKey};
use tokio::sync::Notify;

use crate::core::{self, Finding, Grace, IpAddresses, Plan, RangeConfig, Ranges};

/// Configuration of the `clusterip-alloc` controller.
#[derive(Clone, Debug)]
pub struct ClusterIpAllocConfig {
    /// `--service-cluster-ip-range`: one CIDR or two of different families; empty means
    /// "follow the cluster's ServiceCIDR objects".
    pub service_cluster_ip_range: Vec<IpNet>,
    /// `--concurrent-clusterip-syncs`: Services reconciled at once (default 5).
    pub concurrent_syncs: usize,
    /// How long IPAddress findings wait, as upstream's repair loop waits (no flag: tests
    /// shorten it so that our report comes before the API server's own repair).
    pub ip_address_grace: Grace,
    /// `--assign`: write ClusterIPs where the API server left them empty (default off: a
    /// stock API server allocates them, and we never write a Service).
    pub assign: bool,
}

impl Default for ClusterIpAllocConfig {
    fn default() -> Self {
        ClusterIpAllocConfig {
            service_cluster_ip_range: Vec::new(),
            concurrent_syncs: 5,
            ip_address_grace: Grace::default(),
            assign: false,
        }
    }
}

/// Errors of the controller (reconciles report theirs as [`scm_allocator::shell::Error`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The flag's ranges are invalid.
    #[error(transparent)]
    Config(#[from] core::ConfigError),
}

/// The capacity gauges' label: `cidr`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CidrLabel {
    /// The CIDR.
    pub cidr: String,
}

/// The allocation counters' labels: `cidr` (empty when unknown) and `scope`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CidrScopeLabel {
    /// The CIDR (or, for a full family, its CIDRs joined by commas).
    pub cidr: String,
    /// `dynamic` (picked) or `static` (requested).
    pub scope: String,
}

fn label(cidr: Option<IpNet>, scope: &str) -> CidrScopeLabel {
    CidrScopeLabel {
        cidr: cidr.map(|c| c.to_string()).unwrap_or_default(),
        scope: scope.into(),
    }
}

/// The ClusterIP core as the shell sees it: where the ranges come from.
pub struct ClusterIps {
    /// The flag's ranges, when given.
    pub flag: Option<RangeConfig>,
    /// Otherwise the ServiceCIDR informer.
    pub cidrs: Option<Informer<ServiceCIDR>>,
    /// The IPAddress informer (`None`: the Services are the only state).
    pub ips: Option<Informer<IPAddress>>,
    /// The process's Service informer (the shell's own), to know whether its watch is current.
    pub services: Option<Informer<Service>>,
    /// Upstream's waiting times for IPAddress findings.
    pub grace: Grace,
}

impl ClusterIps {
    fn range_config(&self) -> RangeConfig {
        match (&self.flag, &self.cidrs) {
            (Some(f), _) => f.clone(),
            (None, Some(informer)) => {
                let objs: Vec<ServiceCIDR> =
                    informer.list().iter().map(|o| (**o).clone()).collect();
                RangeConfig::from_service_cidrs(&objs)
            }
            (None, None) => RangeConfig::from_service_cidrs(&[]),
        }
    }
}

impl Allocator for ClusterIps {
    type Pool = Ranges;
    type Finding = Finding;
    type Gauge = Family<CidrLabel, Gauge>;
    type Label = CidrScopeLabel;

    const FINDING_REASONS: &'static [&'static str] = &[
        "ClusterIPNotValid",
        "ClusterIPOutOfRange",
        "ClusterIPAlreadyAllocated",
        "ClusterIPNotAllocated",
        "IPAddressNotAllocated",
        "IPAddressWrongReference",
    ];
    const REFUSAL_REASONS: &'static [&'static str] =
        &["ServiceCIDRFull", "ClusterIPAllocationFailed"];
    /// Named as kube-apiserver's (`pkg/registry/core/service/ipallocator`).
    const METRICS: MetricNames = MetricNames {
        kind: "clusterip",
        unit: "ip",
        nouns: ("IPs", "Cluster IPs"),
        repair_help: "Number of errors detected on clusterips by the repair loop broken down by type of error: leak, repair, full, outOfRange, duplicate, unknown, invalid",
    };
    const CONDITION: Option<&'static str> = Some(crate::CLUSTER_IP_VALID);

    fn watch(&self, notify: &Arc<Notify>) {
        if let Some(c) = &self.cidrs {
            let n = notify.clone();
            c.subscribe(move |_| n.notify_one());
        }
        if let Some(i) = &self.ips {
            let n = notify.clone();
            i.subscribe(move |_| n.notify_one());
        }
    }

    /// An API server that does not serve IPAddresses (its list fails) is not waited for: the
    /// Services are then the only state, as on a server that does not allocate.
    fn synced(&self) -> bool {
        self.cidrs.as_ref().is_none_or(|c| c.is_synced())
            && self
                .ips
                .as_ref()
                .is_none_or(|i| i.is_synced() || i.failing_for().is_some())
    }

    fn build(&self, services: &[&Service], pending: &Pending<ObjectKey, IpAddr>) -> MirrorOf<Self> {
        let config = self.range_config();
        let Some(informer) = self.ips.as_ref().filter(|i| i.is_synced()) else {
            return core::build(&config, services, pending);
        };
        let held = informer.list();
        let objects: Vec<&IPAddress> = held.iter().map(|o| o.as_ref()).collect();
        let ips = IpAddresses {
            objects: &objects,
            grace: self.grace,
            current: informer.failing_for().is_none()
                && self
                    .services
                    .as_ref()
                    .is_none_or(|s| s.failing_for().is_none()),
        };
        core::build_with(&config, services, pending, Some(&ips))
    }

    fn subject(&self, key: &ObjectKey) -> Option<ObjectReference> {
        Some(self.ips.as_ref()?.get(key)?.object_ref(&()))
    }

    fn holdings(&self, svc: &Service) -> Vec<IpAddr> {
        core::claimed_ips(svc)
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect()
    }

    fn publish(
        &self,
        metrics: &MetricsOf<Self>,
        prev: Option<&MirrorOf<Self>>,
        next: &MirrorOf<Self>,
    ) {
        let now = next.pool.capacity();
        // CIDRs that went away stop being reported.
        for (cidr, _, _) in prev.map(|p| p.pool.capacity()).unwrap_or_default() {
            if !now.iter().any(|(c, _, _)| *c == cidr) {
                let l = CidrLabel {
                    cidr: cidr.to_string(),
                };
                metrics.allocated.remove(&l);
                metrics.available.remove(&l);
            }
        }
        for (cidr, used, free) in now {
            let l = CidrLabel {
                cidr: cidr.to_string(),
            };
            let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            metrics.allocated.get_or_create(&l).set(gauge(used));
            metrics.available.get_or_create(&l).set(gauge(free));
        }
    }

    fn step(&self, m: &mut MirrorOf<Self>, svc: &Service) -> Step<IpAddr, CidrScopeLabel> {
        let plan = core::plan(m, svc, &mut rand::rng());
        let fresh = core::new_ips(svc, &plan);
        let mut count: Vec<(CidrScopeLabel, u64)> = fresh
            .iter()
            .map(|ip| (label(m.pool.cidr_of(*ip), "dynamic"), 1))
            .collect();
        let mut service = Box::new(svc.clone());
        match &plan {
            Plan::Nothing => return Step::Nothing,
            Plan::Reject(r) => {
                // ServiceCIDRFull is the bitmap repair's; where the API server keeps
                // IPAddresses, a full range is only the create's error, as upstream has it.
                let reason = match (&r.full, &m.pool.counted) {
                    (Some(_), Some(_)) => "ClusterIPAllocationFailed",
                    _ => r.reason(),
                };
                let count = match &r.full {
                    Some(Finding::Full { cidrs, .. }) => CidrScopeLabel {
                        cidr: cidrs.clone(),
                        scope: "dynamic".into(),
                    },
                    _ => label(None, "static"),
                };
                return Step::Refuse {
                    reason,
                    action: "ClusterIPAllocation",
                    message: r.message.clone(),
                    count,
                };
            }
            Plan::Assign { cluster_ips, .. } => {
                // Requested addresses this write honours (a Service that lacked its family
                // fields): upstream counts those as "static" allocations.
                for ip in cluster_ips.iter().filter_map(|c| c.parse::<IpAddr>().ok()) {
                    if !fresh.contains(&ip) {
                        count.push((label(m.pool.cidr_of(ip), "static"), 1));
                    }
                }
                core::apply(&plan, &mut service);
            }
            Plan::Clear => core::apply(&plan, &mut service),
        }
        Step::Write {
            service,
            fresh,
            count,
            plan: format!("{plan:?}"),
        }
    }
}

/// Runs `clusterip-alloc` until `ctx.shutdown` is cancelled.
pub async fn run(ctx: ControllerContext, config: ClusterIpAllocConfig) -> Result<(), Error> {
    let flag = if config.service_cluster_ip_range.is_empty() {
        None
    } else {
        Some(RangeConfig::from_flag(&config.service_cluster_ip_range)?)
    };
    let cidrs = flag.is_none().then(|| ctx.informers.service_cidrs());
    let ips = Some(ctx.informers.ip_addresses());
    let core = ClusterIps {
        flag,
        cidrs,
        ips,
        services: Some(ctx.informers.services()),
        grace: config.ip_address_grace,
    };
    shell::run(ctx, core, config.concurrent_syncs, config.assign).await;
    Ok(())
}

//! `nodeport-alloc` as an [`Allocator`] of the shared allocator shell
//! ([`scm_allocator::shell`]): node ports from one range, plain capacity gauges, and
//! assignments written into `spec.ports[].nodePort` and `spec.healthCheckNodePort`.

use k8s_openapi::api::core::v1::Service;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::gauge::Gauge;
use scm_allocator::shell::{self, Allocator, MetricNames, MetricsOf, MirrorOf, Step};
use scm_allocator::{Pending, PortRange, PortSpan, Report};
use scm_runtime::{ControllerContext, ObjectKey};

use crate::core::{self, Finding, Plan};

/// Configuration of the `nodeport-alloc` controller.
#[derive(Clone, Debug)]
pub struct NodePortAllocConfig {
    /// `--service-node-port-range` (default 30000-32767).
    pub service_node_port_range: PortSpan,
    /// `--concurrent-nodeport-syncs`: Services reconciled at once (default 5).
    pub concurrent_syncs: usize,
    /// `--assign`: write NodePorts where the API server left them empty (default off: a stock
    /// API server allocates them, and we never write a Service).
    pub assign: bool,
}

impl Default for NodePortAllocConfig {
    fn default() -> Self {
        NodePortAllocConfig {
            service_node_port_range: PortSpan {
                base: 30000,
                size: 2768,
            },
            concurrent_syncs: 5,
            assign: false,
        }
    }
}

/// Errors of the controller (of its reconciles; starting it cannot fail).
pub use scm_allocator::shell::Error;

/// The allocation counters' label: `scope` (dynamic or static).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabel {
    /// `dynamic` (picked) or `static` (requested).
    pub scope: String,
}

fn scope(s: &str) -> ScopeLabel {
    ScopeLabel { scope: s.into() }
}

/// The NodePort core as the shell sees it.
pub struct NodePorts {
    /// `--service-node-port-range`.
    pub span: PortSpan,
}

impl Allocator for NodePorts {
    type Pool = PortRange;
    type Finding = Finding;
    type Gauge = Gauge;
    type Label = ScopeLabel;

    const FINDING_REASONS: &'static [&'static str] = &["PortAlreadyAllocated", "PortOutOfRange"];
    const REFUSAL_REASONS: &'static [&'static str] = &["PortRangeFull", "NodePortAllocationFailed"];
    /// Named as kube-apiserver's (`pkg/registry/core/service/portallocator`).
    const METRICS: MetricNames = MetricNames {
        kind: "nodeport",
        unit: "port",
        nouns: ("NodePorts", "NodePort"),
        repair_help: "Number of errors detected on ports by the repair loop broken down by type of error: leak, repair, full, outOfRange, duplicate, unknown",
    };
    /// NodePort findings are only Events (issue 15 asks for `ClusterIPValid` alone).
    const CONDITION: Option<&'static str> = None;

    fn build(&self, services: &[&Service], pending: &Pending<ObjectKey, i32>) -> MirrorOf<Self> {
        core::build(self.span, services, pending)
    }

    fn holdings(&self, svc: &Service) -> Vec<i32> {
        core::collect_node_ports(svc)
    }

    fn publish(
        &self,
        metrics: &MetricsOf<Self>,
        _prev: Option<&MirrorOf<Self>>,
        next: &MirrorOf<Self>,
    ) {
        let (used, free) = core::capacity(next);
        metrics.allocated.set(used as i64);
        metrics.available.set(free as i64);
    }

    fn step(&self, mirror: &mut MirrorOf<Self>, svc: &Service) -> Step<i32, ScopeLabel> {
        let plan = core::plan(mirror, svc, &mut rand::rng());
        let fresh = core::new_ports(svc, &plan);
        // Requested ports this write honours: upstream counts those as "static" allocations.
        let requested = match &plan {
            Plan::Assign { .. } => core::collect_node_ports(svc).len() as u64,
            _ => 0,
        };
        let mut service = Box::new(svc.clone());
        match &plan {
            Plan::Nothing => return Step::Nothing,
            Plan::Reject(message) => {
                return Step::Refuse {
                    reason: "NodePortAllocationFailed",
                    action: "PortAllocation",
                    message: message.clone(),
                    count: scope("static"),
                };
            }
            Plan::Full(f) => {
                return Step::Refuse {
                    reason: f.reason(),
                    action: f.action(),
                    message: f.message(),
                    count: scope("dynamic"),
                };
            }
            _ => core::apply(&plan, &mut service),
        }
        let mut count = vec![(scope("dynamic"), fresh.len() as u64)];
        if requested > 0 {
            count.push((scope("static"), requested));
        }
        Step::Write {
            service,
            fresh,
            count,
            plan: format!("{plan:?}"),
        }
    }
}

/// Runs `nodeport-alloc` until `ctx.shutdown` is cancelled.
pub async fn run(ctx: ControllerContext, config: NodePortAllocConfig) -> Result<(), Error> {
    let core = NodePorts {
        span: config.service_node_port_range,
    };
    shell::run(ctx, core, config.concurrent_syncs, config.assign).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use scm_allocator::shell::Shell;
    use scm_runtime::{Change, Informer};

    use super::*;

    fn svc(name: &str, node_port: i32) -> Arc<Service> {
        Arc::new(Service {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("NodePort".into()),
                ports: Some(vec![ServicePort {
                    port: 80,
                    node_port: Some(node_port),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        })
    }

    #[test]
    fn a_relist_drops_services_deleted_while_the_watch_was_down() {
        let services = Informer::<Service>::detached("Service", scm_runtime::informer::key_of);
        let shell = Shell::new(
            NodePorts {
                span: NodePortAllocConfig::default().service_node_port_range,
            },
            services.clone(),
            MetricsOf::<NodePorts>::default(),
            false,
        );
        services.deliver(Change::Relisted(vec![svc("a", 30001), svc("b", 30002)]));
        shell.rebuild();
        let holders = |shell: &Shell<NodePorts>| {
            shell.with_mirror(|m| {
                let m = m.expect("rebuilt");
                let mut v: Vec<(i32, String)> =
                    m.owners.iter().map(|(p, k)| (*p, k.name.clone())).collect();
                v.sort();
                v
            })
        };
        assert_eq!(
            holders(&shell),
            vec![(30001, "a".to_string()), (30002, "b".to_string())]
        );
        // The watch was down while "a" was deleted; the new list has only "b".
        services.deliver(Change::Relisted(vec![svc("b", 30002)]));
        shell.rebuild();
        assert_eq!(holders(&shell), vec![(30002, "b".to_string())]);
        assert_eq!(
            shell.metrics().allocated.get(),
            1,
            "the gauge follows the relist"
        );
    }
}

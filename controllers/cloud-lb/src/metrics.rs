//! upstream's `service_controller` metric families.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use scm_runtime::ControllerContext;

/// The load-balancer controller's own metrics (beside the runtime's reconcile metrics).
#[derive(Clone)]
pub(crate) struct LbMetrics {
    /// Load balancers configured (ensures and host updates).
    pub sync_total: Counter,
    /// Host updates that failed.
    pub nodesync_errors: Counter,
    /// One observation per node-sync pass over every Service.
    pub nodesync_latency: Histogram,
    /// One observation per Service's host update.
    pub host_update_latency: Histogram,
    /// Class-less Services we refuse because another controller already serves them.
    pub served_elsewhere: Gauge,
}

impl LbMetrics {
    /// Registers the families in the context's registry.
    pub fn register(ctx: &ControllerContext) -> Self {
        let m = LbMetrics {
            sync_total: Counter::default(),
            nodesync_errors: Counter::default(),
            nodesync_latency: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            host_update_latency: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            served_elsewhere: Gauge::default(),
        };
        let mut reg = ctx.metrics.registry();
        reg.register(
            "service_controller_loadbalancer_sync",
            "A metric counting the amount of times any load balancer has been configured, as an effect of service/node changes on the cluster",
            m.sync_total.clone(),
        );
        reg.register(
            "service_controller_nodesync_error",
            "A metric counting the amount of times any load balancer has been configured and errored, as an effect of node changes on the cluster",
            m.nodesync_errors.clone(),
        );
        reg.register(
            "service_controller_nodesync_latency_seconds",
            "A metric measuring the latency for nodesync which updates loadbalancer hosts on cluster node updates.",
            m.nodesync_latency.clone(),
        );
        reg.register(
            "service_controller_update_loadbalancer_host_latency_seconds",
            "A metric measuring the latency for updating each load balancer hosts.",
            m.host_update_latency.clone(),
        );
        reg.register(
            "service_controller_loadbalancer_served_elsewhere",
            "Class-less LoadBalancer Services not served because another controller already publishes their load balancer",
            m.served_elsewhere.clone(),
        );
        m
    }
}

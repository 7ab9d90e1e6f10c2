//! upstream's `service_controller` metric families.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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
    /// Ensures refused until the Service changes (invalid or unsafe asks), by reason.
    pub refusals: Family<ReasonLabel, Counter>,
    /// Warnings about annotations the provider does not implement (one per Service and set).
    pub unsupported_annotations: Counter,
}

/// The `reason` label of refusals: the refusal's code (e.g. `HealthCheckPortNotOwned`, or the
/// cloud API's), else `InvalidService`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    /// Why the Service was refused.
    pub reason: String,
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
            refusals: Family::default(),
            unsupported_annotations: Counter::default(),
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
        reg.register(
            "service_controller_loadbalancer_refusals",
            "Load balancer ensures refused until the Service changes (an invalid annotation, or an ask unsafe for other tenants such as a foreign health-check port or subnet, or too many security-group rules), by reason",
            m.refusals.clone(),
        );
        reg.register(
            "service_controller_loadbalancer_unsupported_annotations",
            "Warnings that a Service carries provider annotations this controller does not implement (one per Service and distinct set)",
            m.unsupported_annotations.clone(),
        );
        m
    }
}

/// The `kind` label of the inventory sweep's families.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub(crate) struct KindLabel {
    /// `load_balancer`, `target_group` or `security_group_rule`.
    pub kind: String,
}

/// The cloud inventory sweep's metrics.
#[derive(Clone)]
pub(crate) struct InventoryMetrics {
    /// Orphans the last sweep left in the cloud (reported, or not deleted), by kind.
    pub orphaned: Family<KindLabel, Gauge>,
    /// Orphans deleted, by kind.
    pub deleted: Family<KindLabel, Counter>,
    /// Sweeps completed.
    pub sweeps: Counter,
    /// Sweeps that failed (listing failed, or the Service cache was not synced).
    pub sweep_errors: Counter,
}

impl InventoryMetrics {
    /// Registers the families in the context's registry.
    pub fn register(ctx: &ControllerContext) -> Self {
        let m = InventoryMetrics {
            orphaned: Family::default(),
            deleted: Family::default(),
            sweeps: Counter::default(),
            sweep_errors: Counter::default(),
        };
        let mut reg = ctx.metrics.registry();
        reg.register(
            "service_controller_orphaned_cloud_resources",
            "Cloud resources tagged for this cluster that no live LoadBalancer Service we serve accounts for, as the last inventory sweep left them (reported, or not yet deleted)",
            m.orphaned.clone(),
        );
        reg.register(
            "service_controller_orphaned_cloud_resources_deleted",
            "Orphaned cloud resources the inventory sweep deleted (--cloud-orphans=delete)",
            m.deleted.clone(),
        );
        reg.register(
            "service_controller_cloud_inventory_sweeps",
            "Cloud inventory sweeps completed",
            m.sweeps.clone(),
        );
        reg.register(
            "service_controller_cloud_inventory_sweep_errors",
            "Cloud inventory sweeps that failed before deciding anything",
            m.sweep_errors.clone(),
        );
        m
    }
}

//! Metric families, named as kube-controller-manager names them
//! (`endpoint_slice_controller_*`, `endpoint_slice_mirroring_controller_*`), plus our own
//! writes-per-reconcile histogram. prometheus-client follows OpenMetrics, so counters gain a
//! `_total` suffix that upstream's names lack (a deliberate, unavoidable difference).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use scm_runtime::{Metrics, ObjectKey};

/// `operation` label of `changes`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    /// create, update or delete.
    pub operation: String,
}

/// `result` label of `syncs`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// success, stale or error.
    pub result: String,
}

/// Labels of `endpointslices_changed_per_sync`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangedLabels {
    /// Auto or Disabled.
    pub topology: String,
    /// The trafficDistribution in effect, or empty.
    pub traffic_distribution: String,
}

/// Label of `services_count_by_traffic_distribution`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficDistributionLabel {
    /// The trafficDistribution value.
    pub traffic_distribution: String,
}

/// Label of our writes-per-reconcile histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    /// Controller name.
    pub controller: String,
}

#[derive(Clone, Default)]
struct PerService {
    desired_endpoints: usize,
    num_slices: usize,
    desired_slices: usize,
    traffic_distribution: Option<String>,
}

/// The `trafficDistribution` values counted (as upstream's gauge).
const TRAFFIC: [&str; 3] = ["PreferClose", "PreferSameZone", "PreferSameNode"];

/// The families one slice controller reports.
#[derive(Clone)]
pub struct SliceMetrics {
    /// endpoints_added_per_sync.
    pub added: Family<Vec<(String, String)>, Histogram>,
    /// endpoints_removed_per_sync.
    pub removed: Family<Vec<(String, String)>, Histogram>,
    /// endpoints_desired.
    pub desired: Gauge,
    /// num_endpoint_slices.
    pub num_slices: Gauge,
    /// desired_endpoint_slices.
    pub desired_slices: Gauge,
    /// changes{operation}.
    pub changes: Family<OperationLabel, Counter>,
    /// endpointslices_changed_per_sync{topology,traffic_distribution}.
    pub changed_per_sync: Family<ChangedLabels, Histogram>,
    /// syncs{result}.
    pub syncs: Family<ResultLabel, Counter>,
    /// services_count_by_traffic_distribution.
    pub by_traffic_distribution: Family<TrafficDistributionLabel, Gauge>,
    /// Ours: API writes made by one reconcile.
    pub writes_per_reconcile: Family<ControllerLabel, Histogram>,
    /// Ours: how long one slice write took, from the call to its answer, including the wait in
    /// the client's queue and for its rate limit (what a sync spends writing).
    pub write_duration: Histogram,
    per_service: Arc<Mutex<HashMap<ObjectKey, PerService>>>,
}

fn hist_family<L: Clone + std::hash::Hash + Eq>() -> Family<L, Histogram> {
    Family::new_with_constructor(|| Histogram::new(exponential_buckets(2.0, 2.0, 15)))
}

impl SliceMetrics {
    /// Registers the families under `subsystem` (e.g. `endpoint_slice_controller`).
    pub fn register(m: &Metrics, subsystem: &str, controller: &str) -> Self {
        let s = SliceMetrics {
            added: hist_family(),
            removed: hist_family(),
            desired: Gauge::default(),
            num_slices: Gauge::default(),
            desired_slices: Gauge::default(),
            changes: Family::default(),
            changed_per_sync: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(1.0, 2.0, 12))
            }),
            syncs: Family::default(),
            by_traffic_distribution: Family::default(),
            writes_per_reconcile: Family::new_with_constructor(|| {
                Histogram::new([0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0])
            }),
            // client-go's REST latency buckets.
            write_duration: Histogram::new([
                0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0,
            ]),
            per_service: Arc::default(),
        };
        let mut r = m.registry();
        let name = |n: &str| format!("{subsystem}_{n}");
        r.register(
            name("endpoints_added_per_sync"),
            "Number of endpoints added on each Service sync",
            s.added.clone(),
        );
        r.register(
            name("endpoints_removed_per_sync"),
            "Number of endpoints removed on each Service sync",
            s.removed.clone(),
        );
        r.register(
            name("endpoints_desired"),
            "Number of endpoints desired",
            s.desired.clone(),
        );
        r.register(
            name("num_endpoint_slices"),
            "Number of EndpointSlices",
            s.num_slices.clone(),
        );
        r.register(
            name("desired_endpoint_slices"),
            "Number of EndpointSlices that would exist with perfect endpoint allocation",
            s.desired_slices.clone(),
        );
        r.register(
            name("changes"),
            "Number of EndpointSlice changes",
            s.changes.clone(),
        );
        r.register(
            name("endpointslices_changed_per_sync"),
            "Number of EndpointSlices changed on each Service sync",
            s.changed_per_sync.clone(),
        );
        r.register(
            name("syncs"),
            "Number of EndpointSlice syncs",
            s.syncs.clone(),
        );
        if subsystem == "endpoint_slice_controller" {
            r.register(
                name("services_count_by_traffic_distribution"),
                "Number of Services using some specific trafficDistribution",
                s.by_traffic_distribution.clone(),
            );
        }
        r.register(
            format!(
                "service_controller_manager_{}_writes_per_reconcile",
                controller.replace('-', "_")
            ),
            "API writes made by one reconcile",
            s.writes_per_reconcile.clone(),
        );
        r.register(
            format!(
                "service_controller_manager_{}_write_duration_seconds",
                controller.replace('-', "_")
            ),
            "Time one EndpointSlice write took, including the client's queue and rate limit",
            s.write_duration.clone(),
        );
        drop(r);
        // Every known value has a series from the start, at 0, as upstream's gauge.
        for t in TRAFFIC {
            s.by_traffic_distribution
                .get_or_create(&TrafficDistributionLabel {
                    traffic_distribution: t.into(),
                })
                .set(0);
        }
        s
    }

    /// Counts one write that took `took` from its call to its answer.
    pub fn wrote(&self, op: &str, took: std::time::Duration) {
        self.write_duration.observe(took.as_secs_f64());
        self.change(op);
    }

    /// Counts one write.
    pub fn change(&self, op: &str) {
        self.changes
            .get_or_create(&OperationLabel {
                operation: op.into(),
            })
            .inc();
    }

    /// Counts one sync by result.
    pub fn sync(&self, result: &str) {
        self.syncs
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    /// Records a Service's figures and moves the totals by the difference (upstream's metrics
    /// cache). Constant time: walking every Service here made a relist of N Services N².
    pub fn set_service(
        &self,
        key: &ObjectKey,
        desired_endpoints: usize,
        num_slices: usize,
        desired_slices: usize,
        traffic_distribution: Option<String>,
    ) {
        let new = PerService {
            desired_endpoints,
            num_slices,
            desired_slices,
            traffic_distribution,
        };
        let mut m = self.per_service.lock().unwrap_or_else(|e| e.into_inner());
        let old = m.insert(key.clone(), new.clone());
        self.add(old.as_ref(), -1);
        self.add(Some(&new), 1);
    }

    /// Forgets a deleted Service.
    pub fn delete_service(&self, key: &ObjectKey) {
        let mut m = self.per_service.lock().unwrap_or_else(|e| e.into_inner());
        let old = m.remove(key);
        self.add(old.as_ref(), -1);
    }

    fn add(&self, v: Option<&PerService>, sign: i64) {
        let Some(v) = v else { return };
        self.desired.inc_by(sign * v.desired_endpoints as i64);
        self.num_slices.inc_by(sign * v.num_slices as i64);
        self.desired_slices.inc_by(sign * v.desired_slices as i64);
        if let Some(t) = v
            .traffic_distribution
            .as_deref()
            .filter(|t| TRAFFIC.contains(t))
        {
            self.by_traffic_distribution
                .get_or_create(&TrafficDistributionLabel {
                    traffic_distribution: t.into(),
                })
                .inc_by(sign);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_follow_updates_and_deletes_without_walking_every_service() {
        let m = SliceMetrics::register(&Metrics::new(), "endpoint_slice_controller", "es");
        let (a, b) = (ObjectKey::new("n", "a"), ObjectKey::new("n", "b"));
        m.set_service(&a, 10, 1, 1, Some("PreferClose".into()));
        m.set_service(&b, 5, 2, 1, None);
        m.set_service(&a, 3, 1, 1, Some("PreferSameNode".into()));
        assert_eq!(m.desired.get(), 8);
        assert_eq!(m.num_slices.get(), 3);
        assert_eq!(m.desired_slices.get(), 2);
        let td = |t: &str| {
            m.by_traffic_distribution
                .get_or_create(&TrafficDistributionLabel {
                    traffic_distribution: t.into(),
                })
                .get()
        };
        assert_eq!((td("PreferClose"), td("PreferSameNode")), (0, 1));
        m.delete_service(&a);
        m.delete_service(&a);
        assert_eq!((m.desired.get(), m.num_slices.get()), (5, 2));
        assert_eq!(td("PreferSameNode"), 0);
    }

    #[test]
    fn each_write_is_counted_and_timed_under_the_controllers_name() {
        let reg = Metrics::new();
        let m = SliceMetrics::register(&reg, "endpoint_slice_controller", "endpointslice");
        m.wrote("update", std::time::Duration::from_millis(300));
        let text = reg.encode();
        for line in [
            "service_controller_manager_endpointslice_write_duration_seconds_count 1",
            "service_controller_manager_endpointslice_write_duration_seconds_sum 0.3",
            "endpoint_slice_controller_changes_total{operation=\"update\"} 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}

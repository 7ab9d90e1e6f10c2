//! The process-wide Prometheus registry and the metrics every controller has: reconcile
//! counts, errors and durations, and workqueue depth, adds, retries, queue and work durations
//! (named, labelled and bucketed as client-go's workqueue metrics).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels naming a controller.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    /// Controller name as in `--controllers`.
    pub controller: String,
}

/// Labels naming a workqueue, as client-go's `workqueue_*` metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    /// Queue name (the controller's name).
    pub name: String,
}

/// Labels of a failed reconcile: the controller and the error variant.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Controller name.
    pub controller: String,
    /// The error's metric label (its variant, never an object name).
    pub error: String,
}

/// Labels of the leader gauge, as client-go's `leader_election_master_status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseLabel {
    /// Lease name.
    pub name: String,
}

/// Shared registry plus the metric families every controller reports into.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    /// Reconciles started, per controller.
    pub reconciles: Family<ControllerLabel, Counter>,
    /// Reconciles that failed, per controller and error.
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    /// Reconcile durations, per controller.
    pub reconcile_duration: Family<ControllerLabel, Histogram>,
    /// Keys waiting in each controller's queue.
    pub workqueue_depth: Family<QueueLabel, Gauge>,
    /// Keys ever added to each queue.
    pub workqueue_adds: Family<QueueLabel, Counter>,
    /// Keys requeued after a failure.
    pub workqueue_retries: Family<QueueLabel, Counter>,
    /// How long a key waited from its add (or its delayed add coming due) to a worker.
    pub workqueue_queue_duration: Family<QueueLabel, Histogram>,
    /// How long a worker spent on a key (the reconcile).
    pub workqueue_work_duration: Family<QueueLabel, Histogram>,
    /// 1 while this process holds the Lease.
    pub leader: Family<LeaseLabel, Gauge>,
    /// Server-side applies of Service conditions sent, per controller ([`crate::conditions`]).
    pub condition_writes: Family<ControllerLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with the common families registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let reconciles = Family::<ControllerLabel, Counter>::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_duration = Family::<ControllerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        let workqueue_depth = Family::<QueueLabel, Gauge>::default();
        let workqueue_adds = Family::<QueueLabel, Counter>::default();
        let workqueue_retries = Family::<QueueLabel, Counter>::default();
        // client-go's buckets for both: 10 ns to 10 s by factors of 10.
        let workqueue_queue_duration =
            Family::<QueueLabel, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(1e-8, 10.0, 10))
            });
        let workqueue_work_duration = Family::<QueueLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1e-8, 10.0, 10))
        });
        let leader = Family::<LeaseLabel, Gauge>::default();
        let condition_writes = Family::<ControllerLabel, Counter>::default();
        registry.register(
            "service_controller_manager_reconcile",
            "Reconciles per controller",
            reconciles.clone(),
        );
        registry.register(
            "service_controller_manager_reconcile_errors",
            "Failed reconciles per controller and error",
            reconcile_errors.clone(),
        );
        registry.register(
            "service_controller_manager_reconcile_duration_seconds",
            "Reconcile duration per controller",
            reconcile_duration.clone(),
        );
        registry.register(
            "workqueue_depth",
            "Current depth of workqueue",
            workqueue_depth.clone(),
        );
        registry.register(
            "workqueue_adds",
            "Total number of adds handled by workqueue",
            workqueue_adds.clone(),
        );
        registry.register(
            "workqueue_retries",
            "Total number of retries handled by workqueue",
            workqueue_retries.clone(),
        );
        registry.register(
            "workqueue_queue_duration_seconds",
            "How long in seconds an item stays in workqueue before being requested",
            workqueue_queue_duration.clone(),
        );
        registry.register(
            "workqueue_work_duration_seconds",
            "How long in seconds processing an item from workqueue takes",
            workqueue_work_duration.clone(),
        );
        registry.register(
            "leader_election_master_status",
            "Gauge of if the reporting system is master of the relevant lease, 0 indicates backup, 1 indicates master",
            leader.clone(),
        );
        registry.register(
            "service_controller_manager_condition_writes",
            "Server-side applies of Service conditions, per controller",
            condition_writes.clone(),
        );
        crate::client::metrics::register(&mut registry);
        Metrics {
            registry: Arc::new(Mutex::new(registry)),
            reconciles,
            reconcile_errors,
            reconcile_duration,
            workqueue_depth,
            workqueue_adds,
            workqueue_retries,
            workqueue_queue_duration,
            workqueue_work_duration,
            leader,
            condition_writes,
        }
    }

    /// How many condition applies `controller` has sent.
    pub fn condition_writes(&self, controller: &str) -> u64 {
        self.condition_writes
            .get_or_create(&ControllerLabel {
                controller: controller.to_string(),
            })
            .get()
    }

    /// The registry, for a controller to register its own families at start.
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Everything in Prometheus text format, for `/metrics`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let reg = self.registry();
        if prometheus_client::encoding::text::encode(&mut out, &reg).is_err() {
            out.clear();
        }
        out
    }

    /// Creates a controller's series at zero, so dashboards see it before its first reconcile.
    pub fn register_controller(&self, controller: &str) {
        let label = ControllerLabel {
            controller: controller.to_string(),
        };
        let _ = self.reconciles.get_or_create(&label);
        let _ = self.reconcile_duration.get_or_create(&label);
        let q = QueueLabel {
            name: controller.to_string(),
        };
        let _ = self.workqueue_depth.get_or_create(&q);
        let _ = self.workqueue_adds.get_or_create(&q);
        let _ = self.workqueue_retries.get_or_create(&q);
        let _ = self.workqueue_queue_duration.get_or_create(&q);
        let _ = self.workqueue_work_duration.get_or_create(&q);
    }

    /// Starts timing one reconcile of `controller`; the duration is recorded when dropped, as
    /// the reconcile duration and as the work duration of the controller's queue.
    pub fn measure(&self, controller: &str) -> ReconcileTimer {
        let label = ControllerLabel {
            controller: controller.to_string(),
        };
        self.reconciles.get_or_create(&label).inc();
        let q = QueueLabel {
            name: controller.to_string(),
        };
        ReconcileTimer {
            hist: self.reconcile_duration.get_or_create(&label).clone(),
            work: self.workqueue_work_duration.get_or_create(&q).clone(),
            start: Instant::now(),
        }
    }

    /// Records how long a key of `queue` waited before a worker took it.
    pub fn observe_queue_duration(&self, queue: &str, waited: Duration) {
        self.workqueue_queue_duration
            .get_or_create(&QueueLabel {
                name: queue.to_string(),
            })
            .observe(waited.as_secs_f64());
    }

    /// Counts a failed reconcile under the error's label.
    pub fn record_error(&self, controller: &str, error: &str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels {
                controller: controller.to_string(),
                error: error.to_string(),
            })
            .inc();
    }
}

/// Records a reconcile's duration when dropped.
pub struct ReconcileTimer {
    hist: Histogram,
    work: Histogram,
    start: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        let secs = self.start.elapsed().as_secs_f64();
        self.hist.observe(secs);
        self.work.observe(secs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_reconcile_counts_and_errors() {
        let m = Metrics::new();
        drop(m.measure("endpointslice"));
        m.record_error("endpointslice", "kube");
        let text = m.encode();
        assert!(text.contains(
            "service_controller_manager_reconcile_total{controller=\"endpointslice\"} 1"
        ));
        assert!(text.contains(
            "service_controller_manager_reconcile_errors_total{controller=\"endpointslice\",error=\"kube\"} 1"
        ));
        assert!(text.contains("service_controller_manager_reconcile_duration_seconds_count{controller=\"endpointslice\"} 1"));
    }

    #[tokio::test(start_paused = true)]
    async fn queue_and_work_durations_land_in_client_go_buckets() {
        let m = Metrics::new();
        m.register_controller("es");
        let q = crate::WorkQueue::new(crate::Backoff::default());
        q.add("k");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_, waited) = q.get_timed().await.expect("key");
        m.observe_queue_duration("es", waited);
        let t = m.measure("es");
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(t);
        let text = m.encode();
        let line = |metric: &str, le: &str| {
            format!("workqueue_{metric}_duration_seconds_bucket{{le=\"{le}\",name=\"es\"}}")
        };
        let count = |metric: &str, le: &str| -> Option<u64> {
            let l = line(metric, le);
            text.lines()
                .find_map(|x| x.strip_prefix(&l))
                .and_then(|v| v.trim().parse().ok())
        };
        // 50 ms: above the 10 ms bucket, within 100 ms.
        assert_eq!(count("queue", "0.01"), Some(0), "{text}");
        assert_eq!(count("queue", "0.1"), Some(1), "{text}");
        // 2 s: above 1 s, within 10 s.
        assert_eq!(count("work", "1.0"), Some(0), "{text}");
        assert_eq!(count("work", "10.0"), Some(1), "{text}");
        assert!(text.contains("workqueue_work_duration_seconds_count{name=\"es\"} 1"));
    }
}

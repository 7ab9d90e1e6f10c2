//! The inventory sweep's shell: while this replica leads, once at the start of each term and
//! then every `--cloud-inventory-interval`, list the cloud, read the Service informer, decide
//! with [`super::orphans`], report, and in `delete` mode delete. Losing the lease cancels a
//! sweep in flight (every deletion is idempotent; the next leader sweeps again).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Service;
use scm_runtime::{ControllerContext, Informer};
use tracing::{debug, info, warn};

use super::{Kind, Orphan, OrphanMode, claims, counts, orphans};
use crate::CloudLbConfig;
use crate::core::ClassFilter;
use crate::metrics::{InventoryMetrics, KindLabel};
use crate::provider::{LoadBalancerProvider, ProviderError};

/// How often a term's first sweep checks whether the Service cache has synced.
const SYNC_POLL: Duration = Duration::from_millis(100);

/// What one sweep concluded.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Orphans found.
    pub found: Vec<Orphan>,
    /// Orphans deleted.
    pub deleted: Vec<Orphan>,
}

/// Runs sweeps while leading until `ctx.shutdown` is cancelled (or the elector goes away).
pub(crate) async fn run(
    ctx: ControllerContext,
    config: CloudLbConfig,
    provider: Arc<dyn LoadBalancerProvider>,
    services: Informer<Service>,
) {
    let metrics = InventoryMetrics::register(&ctx);
    for k in Kind::ALL {
        // Present (as 0) from the start, so an alert on it can tell "none" from "not swept".
        metrics.orphaned.get_or_create(&label(k)).set(0);
    }
    let filter = ClassFilter {
        class: config.load_balancer_class.clone(),
        default_implementation: config.default_load_balancer,
    };
    let mut gate = ctx.leader.clone();
    let mut lost = ctx.leader.clone();
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            ok = gate.wait_leading() => if !ok { return },
        }
        let term = async {
            loop {
                while !services.is_synced() {
                    tokio::time::sleep(SYNC_POLL).await;
                }
                match sweep(&config, &filter, provider.as_ref(), &services).await {
                    Ok(Some(out)) => record(&metrics, &out),
                    Ok(None) => {
                        debug!(
                            provider = provider.provider_name(),
                            "no cloud inventory to sweep"
                        );
                        // Nothing will ever be listed: stay idle for the term.
                        futures::future::pending::<()>().await;
                    }
                    Err(e) => {
                        metrics.sweep_errors.inc();
                        warn!(error = %e, "cloud inventory sweep failed; next one in an interval");
                    }
                }
                tokio::time::sleep(config.inventory_interval).await;
            }
        };
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = lost.wait_lost() => {
                if lost.is_leader() {
                    // The elector went away while we led: nobody renews the Lease.
                    return;
                }
                info!("lost leadership: inventory sweeps stop");
                // The next leader reports from its own sweeps; a follower's stale count would
                // add up with it.
                for k in Kind::ALL {
                    metrics.orphaned.get_or_create(&label(k)).set(0);
                }
            }
            _ = term => {}
        }
    }
}

fn label(k: Kind) -> KindLabel {
    KindLabel {
        kind: k.label().to_string(),
    }
}

fn record(metrics: &InventoryMetrics, out: &Outcome) {
    metrics.sweeps.inc();
    let deleted: BTreeSet<&str> = out.deleted.iter().map(|o| o.arn.as_str()).collect();
    let left = out
        .found
        .iter()
        .filter(|o| !deleted.contains(o.arn.as_str()));
    for (k, n) in counts(left) {
        metrics.orphaned.get_or_create(&label(k)).set(n);
    }
    for (k, n) in counts(&out.deleted) {
        if n > 0 {
            metrics.deleted.get_or_create(&label(k)).inc_by(n as u64);
        }
    }
}

/// One sweep: list first, then read the Services (see the module docs of [`super`] for why
/// this order), decide, report, and delete in `delete` mode. `None` when the provider keeps no
/// inventory.
pub(crate) async fn sweep(
    config: &CloudLbConfig,
    filter: &ClassFilter,
    provider: &dyn LoadBalancerProvider,
    services: &Informer<Service>,
) -> Result<Option<Outcome>, ProviderError> {
    let cluster = &config.cluster_name;
    let Some(inv) = provider.inventory(cluster).await? else {
        return Ok(None);
    };
    if !services.is_synced() {
        // A relist in progress could show a partial view: judge nothing on it.
        return Err(ProviderError::retryable("the Service cache is not synced"));
    }
    let listed = services.list();
    let claims = claims(listed.iter().map(|s| s.as_ref()), filter, |s| {
        provider.resource_names(cluster, s)
    });
    let found = orphans(&inv, &claims, SystemTime::now(), config.inventory_interval);
    for o in &found {
        warn!(
            kind = o.kind.label(),
            arn = %o.arn,
            name = %o.name,
            service = o.service.as_deref().unwrap_or(""),
            rules = o.rules,
            mode = ?config.orphans,
            "orphaned cloud resource: {}",
            o.why.text()
        );
    }
    info!(
        load_balancers = inv.lbs.len(),
        target_groups = inv.tgs.len(),
        orphans = found.len(),
        "cloud inventory swept"
    );
    let mut deleted = vec![];
    if config.orphans == OrphanMode::Delete {
        let mut failed_lbs: BTreeSet<&str> = BTreeSet::new();
        for o in &found {
            if let Some(lb) = o
                .load_balancers
                .iter()
                .find(|l| failed_lbs.contains(l.as_str()))
            {
                // Still attached to a load balancer we could not delete: in use.
                debug!(arn = %o.arn, lb = %lb, "target group kept until its load balancer is deleted");
                continue;
            }
            match provider.delete_orphan(cluster, o).await {
                Ok(()) => {
                    info!(kind = o.kind.label(), arn = %o.arn, service = o.service.as_deref().unwrap_or(""), "deleted orphaned cloud resource");
                    deleted.push(o.clone());
                }
                Err(e) => {
                    warn!(kind = o.kind.label(), arn = %o.arn, error = %e, "orphaned cloud resource not deleted; next sweep retries");
                    if o.kind == Kind::LoadBalancer {
                        failed_lbs.insert(&o.arn);
                    }
                }
            }
        }
    }
    Ok(Some(Outcome { found, deleted }))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::UNIX_EPOCH;

    use async_trait::async_trait;
    use k8s_openapi::api::core::v1::{LoadBalancerStatus, Node};
    use scm_runtime::{Change, ContextBase, LeaderGate};

    use super::*;
    use crate::inventory::{Inventory, TaggedLb, TaggedTg};

    /// A provider whose cloud holds one old load balancer and its group for a Service that no
    /// longer exists; it records inventory calls and deletions.
    #[derive(Default)]
    struct Cloud {
        listed: Mutex<u32>,
        deleted: Mutex<Vec<String>>,
        /// Refuse to delete load balancers (e.g. deletion protection is on).
        refuse_lbs: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl LoadBalancerProvider for Cloud {
        fn provider_name(&self) -> &'static str {
            "cloud"
        }
        fn load_balancer_name(&self, _: &str, s: &Service) -> String {
            s.metadata.name.clone().unwrap_or_default()
        }
        async fn get(
            &self,
            _: &str,
            _: &Service,
        ) -> Result<Option<LoadBalancerStatus>, ProviderError> {
            Ok(None)
        }
        async fn ensure(
            &self,
            _: &str,
            _: &Service,
            _: &[Node],
        ) -> Result<LoadBalancerStatus, ProviderError> {
            Ok(LoadBalancerStatus::default())
        }
        async fn update_hosts(
            &self,
            _: &str,
            _: &Service,
            _: &[Node],
        ) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn ensure_deleted(&self, _: &str, _: &Service) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn inventory(&self, _: &str) -> Result<Option<Inventory>, ProviderError> {
            *self.listed.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            Ok(Some(Inventory {
                lbs: vec![TaggedLb {
                    arn: "lb-gone".into(),
                    name: "gone".into(),
                    service: Some("ns/gone".into()),
                    created: Some(UNIX_EPOCH),
                    vpc: None,
                    rules: 0,
                }],
                tgs: vec![TaggedTg {
                    arn: "tg-gone".into(),
                    name: "gone-80".into(),
                    service: Some("ns/gone".into()),
                    load_balancers: vec!["lb-gone".into()],
                }],
                all_lbs: ["lb-gone".to_string()].into(),
            }))
        }
        async fn delete_orphan(&self, _: &str, o: &Orphan) -> Result<(), ProviderError> {
            if o.kind == Kind::LoadBalancer
                && self.refuse_lbs.load(std::sync::atomic::Ordering::SeqCst)
            {
                return Err(ProviderError::permanent("OperationNotPermitted"));
            }
            self.deleted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(o.arn.clone());
            Ok(())
        }
    }

    impl Cloud {
        fn listed(&self) -> u32 {
            *self.listed.lock().unwrap_or_else(|e| e.into_inner())
        }
        fn deleted(&self) -> Vec<String> {
            self.deleted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        }
    }

    const EVERY: Duration = Duration::from_secs(10);

    fn start(mode: OrphanMode) -> (Arc<Cloud>, ContextBase, tokio::sync::watch::Sender<bool>) {
        let (gate, tx) = LeaderGate::fixed(false);
        let client = kube::Client::try_from(kube::Config::new(
            "http://127.0.0.1:9".parse().expect("url"),
        ))
        .expect("client");
        let base = ContextBase::new(client, gate);
        let ctx = base.context("cloud-lb", "service-controller");
        let services = Informer::<Service>::detached("Service", scm_runtime::informer::key_of);
        services.deliver(Change::Relisted(vec![]));
        let cloud = Arc::new(Cloud::default());
        let config = CloudLbConfig {
            inventory_interval: EVERY,
            orphans: mode,
            ..CloudLbConfig::default()
        };
        tokio::spawn(run(ctx, config, cloud.clone(), services));
        (cloud, base, tx)
    }

    #[tokio::test(start_paused = true)]
    async fn sweeps_run_only_while_leading_at_each_term_start_and_every_interval() {
        let (cloud, base, leader) = start(OrphanMode::Delete);
        tokio::time::sleep(EVERY * 6).await;
        assert_eq!(cloud.listed(), 0, "a follower lists nothing");

        leader.send(true).expect("gate");
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(cloud.listed(), 1, "a sweep at the start of the term");
        assert_eq!(
            cloud.deleted(),
            ["lb-gone", "tg-gone"],
            "load balancer first"
        );
        let text = base.metrics.encode();
        for line in [
            "service_controller_orphaned_cloud_resources_deleted_total{kind=\"load_balancer\"} 1",
            "service_controller_orphaned_cloud_resources_deleted_total{kind=\"target_group\"} 1",
            "service_controller_orphaned_cloud_resources{kind=\"load_balancer\"} 0",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        tokio::time::sleep(EVERY).await;
        assert_eq!(cloud.listed(), 2, "then every interval");

        leader.send(false).expect("gate");
        tokio::time::sleep(EVERY * 6).await;
        assert_eq!(cloud.listed(), 2, "no sweep after losing the lease");

        leader.send(true).expect("gate");
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(cloud.listed(), 3, "a sweep at the start of the next term");
        base.shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn report_mode_counts_and_deletes_nothing() {
        let (cloud, base, leader) = start(OrphanMode::Report);
        leader.send(true).expect("gate");
        tokio::time::sleep(EVERY * 3).await;
        assert!(cloud.listed() >= 3, "{}", cloud.listed());
        assert!(cloud.deleted().is_empty());
        let text = base.metrics.encode();
        for line in [
            "service_controller_orphaned_cloud_resources{kind=\"load_balancer\"} 1",
            "service_controller_orphaned_cloud_resources{kind=\"target_group\"} 1",
            "service_controller_orphaned_cloud_resources{kind=\"security_group_rule\"} 0",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        // A follower reports nothing: the leader counts.
        leader.send(false).expect("gate");
        tokio::time::sleep(Duration::from_millis(10)).await;
        let text = base.metrics.encode();
        let line = "service_controller_orphaned_cloud_resources{kind=\"load_balancer\"} 0";
        assert!(text.contains(line), "{line} in\n{text}");
        base.shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_stays_while_its_load_balancer_cannot_be_deleted() {
        let (cloud, base, leader) = start(OrphanMode::Delete);
        cloud
            .refuse_lbs
            .store(true, std::sync::atomic::Ordering::SeqCst);
        leader.send(true).expect("gate");
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(cloud.listed(), 1);
        assert!(cloud.deleted().is_empty(), "{:?}", cloud.deleted());
        let text = base.metrics.encode();
        for line in [
            "service_controller_orphaned_cloud_resources{kind=\"load_balancer\"} 1",
            "service_controller_orphaned_cloud_resources{kind=\"target_group\"} 1",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        // Once the load balancer can go, the next sweep deletes both.
        cloud
            .refuse_lbs
            .store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(EVERY).await;
        assert_eq!(cloud.deleted(), ["lb-gone", "tg-gone"]);
        base.shutdown.cancel();
    }
}

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

//! The cloud load-balancer service controller: for every `type: LoadBalancer` Service it serves,
//! a [`provider::LoadBalancerProvider`] points a load balancer at the cluster's nodes and the
//! controller publishes `status.loadBalancer`, with the semantics of k8s.io/cloud-provider's
//! service controller.
//!
//! Layout: [`core`] holds the pure decisions (which Services, the finalizer, the stable node
//! set, which node changes matter, status diffs, and [`core::decide`], which turns what the
//! shell observed for one Service into the [`core::Step`] it executes); [`provider`] the
//! contract; [`aws`] and [`local`] the two providers. The shell subscribes to the process's
//! shared Service and Node informers (on every replica), queues Service keys with per-Service
//! backoff (5 s to 300 s), and its workers (only while leading) execute steps: `steps` makes
//! the provider calls and records Events, `status` writes the finalizer and status with a
//! conditional patch recomputed on conflict, `nodes` batches node changes into node-sync passes.
//! [`inventory`] is the cloud inventory sweep beside it: while leading, every
//! `--cloud-inventory-interval`, what the provider finds tagged for the cluster is compared
//! (purely, [`inventory::orphans`]) with the live Services, and orphans are reported or deleted.

pub mod aws;
mod config;
pub mod core;
mod endpoints;
pub mod inventory;
pub mod local;
mod metrics;
mod nodes;
pub mod provider;
mod shell;
mod status;
mod steps;

use std::sync::Arc;
use std::time::Duration;

use scm_runtime::{ControllerContext, ReconcileError};

pub use config::{CloudLbConfig, DEFAULT_INVENTORY_INTERVAL, build_provider};
pub use inventory::OrphanMode;
pub use provider::{LoadBalancerProvider, ProviderError, ProviderKind};
pub use steps::SERVED_ELSEWHERE;

/// How often every Service's hosts are compared with the node set even without node events
/// (upstream's nodeSyncPeriod), and every load balancer we remember is checked for existence
/// (one provider `get` each; recreated when gone).
pub const NODE_SYNC_PERIOD: Duration = Duration::from_secs(100);
/// How long node events are collected before one host-update pass (batching).
pub const NODE_SYNC_DEBOUNCE: Duration = Duration::from_millis(500);

/// Why the controller stopped or a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The provider's configuration is unusable.
    #[error("cloud config: {0}")]
    Config(String),
    /// A provider call failed.
    #[error("{0}")]
    Provider(#[from] ProviderError),
    /// An API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl ReconcileError for Error {
    fn metric_label(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Provider(e) => e.metric_label(),
            Error::Kube(_) => "kube",
        }
    }

    /// A throttle is the account's rate, not this Service's fault: come back after the cloud's
    /// hint, or after a short jittered delay (so throttled Services spread out), without the
    /// per-Service backoff growing towards 300 s. Calls stay paced by the provider's budget.
    fn retry_without_backoff(&self) -> Option<Duration> {
        match self {
            Error::Provider(e @ ProviderError::Throttled { .. }) => Some(
                e.retry_after()
                    .unwrap_or_else(|| THROTTLE_RETRY.start + jitter(THROTTLE_RETRY)),
            ),
            _ => None,
        }
    }
}

/// When an unhinted throttle retries: uniformly within this window.
pub const THROTTLE_RETRY: std::ops::Range<Duration> =
    Duration::from_secs(2)..Duration::from_secs(6);

fn jitter(w: std::ops::Range<Duration>) -> Duration {
    let span = (w.end - w.start).as_millis() as u64;
    Duration::from_millis(rand::random_range(0..span.max(1)))
}

/// Runs the controller with the provider `config` selects until `ctx.shutdown` is cancelled.
pub async fn run(ctx: ControllerContext, config: CloudLbConfig) -> Result<(), Error> {
    let provider = build_provider(&config).await?;
    run_with_provider(ctx, config, provider).await
}

/// Runs the controller with an already built provider (tests, benchmarks, embedders), on the
/// process's shared Service and Node informers.
pub async fn run_with_provider(
    ctx: ControllerContext,
    config: CloudLbConfig,
    provider: Arc<dyn LoadBalancerProvider>,
) -> Result<(), Error> {
    run_with_provider_every(ctx, config, provider, NODE_SYNC_PERIOD).await
}

/// [`run_with_provider`] with another period for the periodic pass (which compares every
/// Service's hosts with the node set and checks that every load balancer we remember still
/// exists); tests use a short one. The cloud inventory sweep ([`inventory`]) runs beside it,
/// every `config.inventory_interval` while leading.
pub async fn run_with_provider_every(
    ctx: ControllerContext,
    config: CloudLbConfig,
    provider: Arc<dyn LoadBalancerProvider>,
    resync: Duration,
) -> Result<(), Error> {
    provider.start(&ctx, &config);
    let services = ctx.informers.services();
    let nodes = ctx.informers.nodes();
    let periods = shell::Periods { resync };
    // The inventory sweep runs beside the shell, on the same Service informer and leader gate.
    let sweep = inventory::sweep::run(
        ctx.clone(),
        config.clone(),
        provider.clone(),
        services.clone(),
    );
    let shell = shell::run(ctx, config, provider, services, nodes, periods);
    tokio::pin!(shell);
    tokio::select! {
        r = &mut shell => r,
        // The sweep ends only with the process (or the elector): the shell decides the end.
        () = sweep => shell.await,
    }
}

#[cfg(test)]
mod retry_tests {
    use super::*;
    use scm_runtime::ReconcileError;

    #[test]
    fn throttles_retry_soon_without_backoff_and_other_failures_back_off() {
        let unhinted = Error::Provider(ProviderError::Throttled {
            message: "Rate exceeded".into(),
            code: Some("Throttling".into()),
            retry_after: None,
            source: None,
        });
        for _ in 0..100 {
            let d = unhinted
                .retry_without_backoff()
                .expect("throttles skip the backoff");
            assert!(THROTTLE_RETRY.contains(&d), "{d:?}");
        }
        let hinted = Error::Provider(ProviderError::Throttled {
            message: "slow down".into(),
            code: None,
            retry_after: Some(Duration::from_secs(30)),
            source: None,
        });
        assert_eq!(
            hinted.retry_without_backoff(),
            Some(Duration::from_secs(30))
        );
        let broken = Error::Provider(ProviderError::retryable("InternalFailure"));
        assert_eq!(broken.retry_without_backoff(), None);
    }
}

//! The load-balancer provider contract: what a cloud (or the local address pool) implements so
//! that the service controller can point a load balancer at the cluster's nodes.
//!
//! # Adding a provider
//!
//! Implement [`LoadBalancerProvider`] and register a constructor in the binary's
//! `--cloud-provider` switch (see [`crate::ProviderKind`]). The controller guarantees:
//!
//! * It calls you only for Services it serves (type `LoadBalancer`, matching
//!   `spec.loadBalancerClass`), after the finalizer `service.kubernetes.io/load-balancer-cleanup`
//!   is on the Service, so [`LoadBalancerProvider::ensure_deleted`] always gets its chance.
//! * Calls for one Service never overlap; calls for different Services run concurrently (up to
//!   `--concurrent-service-syncs`), so the provider must be `Send + Sync` and keep shared state
//!   behind its own locks.
//! * `nodes` is upstream's *stable node set*: nodes not being deleted, not labelled
//!   `node.kubernetes.io/exclude-from-external-load-balancers` (true or unparsable), not tainted
//!   `ToBeDeletedByClusterAutoscaler`. Readiness is deliberately not filtered; the load
//!   balancer's own health checks decide whether a node gets traffic. Nodes may lack
//!   `spec.providerID`; skip those if you need it.
//! * It writes the returned [`LoadBalancerStatus`] to `status.loadBalancer` only if it differs.
//!
//! What the provider must do:
//!
//! * Be idempotent and convergent: `ensure` is called on every Service change and resync, and
//!   after crashes; it must find what an earlier, interrupted call created (by deterministic name
//!   and ownership marks) instead of creating it again, and must not mutate anything that already
//!   matches.
//! * Never modify or delete resources it cannot prove it owns.
//! * Classify failures with [`ProviderError`]: the controller retries `Retryable` with
//!   per-Service exponential backoff (5 s to 300 s), retries `Throttled` after its hint (else
//!   2 to 6 s) without growing that backoff (a throttle is the account's rate), and for `Permanent` (e.g. an invalid annotation) records a Warning Event and
//!   does not retry until the Service changes.
//!   A `Retryable` error with the code [`CAPACITY_EXHAUSTED`] (a full address pool) is also
//!   retried as soon as another Service's load balancer is deleted, since only that can mend it.
//!
//! A minimal provider that hands every Service one fixed hostname:
//!
//! ```
//! use async_trait::async_trait;
//! use cloud_lb::{LoadBalancerProvider, ProviderError};
//! use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, Node, Service};
//!
//! struct Fixed;
//!
//! #[async_trait]
//! impl LoadBalancerProvider for Fixed {
//!     fn provider_name(&self) -> &'static str { "fixed" }
//!     fn load_balancer_name(&self, cluster: &str, svc: &Service) -> String {
//!         format!("{cluster}-{}", svc.metadata.uid.as_deref().unwrap_or(""))
//!     }
//!     async fn get(&self, _: &str, _: &Service) -> Result<Option<LoadBalancerStatus>, ProviderError> {
//!         Ok(None)
//!     }
//!     async fn ensure(&self, _: &str, svc: &Service, nodes: &[Node]) -> Result<LoadBalancerStatus, ProviderError> {
//!         if svc.metadata.annotations.as_ref().is_some_and(|a| a.contains_key("fixed/broken")) {
//!             // An Event, and no retry until the Service changes.
//!             return Err(ProviderError::permanent("fixed/broken is set"));
//!         }
//!         let _targets = nodes.len();
//!         Ok(LoadBalancerStatus {
//!             ingress: Some(vec![LoadBalancerIngress {
//!                 hostname: Some("lb.example.com".into()),
//!                 ..Default::default()
//!             }]),
//!         })
//!     }
//!     async fn update_hosts(&self, _: &str, _: &Service, _: &[Node]) -> Result<(), ProviderError> {
//!         Ok(())
//!     }
//!     async fn ensure_deleted(&self, _: &str, _: &Service) -> Result<(), ProviderError> {
//!         Ok(())
//!     }
//! }
//!
//! // Providers are used as trait objects, chosen at run time:
//! let p: std::sync::Arc<dyn LoadBalancerProvider> = std::sync::Arc::new(Fixed);
//! assert_eq!(p.provider_name(), "fixed");
//! ```
//!
//! Run it with [`crate::run_with_provider`].
//!
//! The contract follows k8s.io/cloud-provider's `LoadBalancer` interface (GetLoadBalancer,
//! GetLoadBalancerName, EnsureLoadBalancer, UpdateLoadBalancer, EnsureLoadBalancerDeleted).
//! Deliberate differences: errors are typed instead of free-form, `ImplementedElsewhere` is a
//! predicate ([`LoadBalancerProvider::implemented_elsewhere`]) checked before any call, and
//! [`LoadBalancerProvider::restore`] lets stateful providers rebuild from Services at start.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{LoadBalancerStatus, Node, Service};

use scm_runtime::ControllerContext;

use crate::CloudLbConfig;
use crate::inventory::{Inventory, Orphan};

/// Why a provider call failed, which decides how the controller retries it.
/// The cause of a [`ProviderError`]: the SDK's or library's own error, shared so that a
/// [`ProviderError`] stays `Clone` (the controller keeps the last one per Service).
pub type ErrorSource = Arc<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Clone, Debug, thiserror::Error)]
pub enum ProviderError {
    /// A transient failure (network, 5xx, a conflicting concurrent change): retry with backoff.
    #[error("{message}")]
    Retryable {
        /// What went wrong, short enough for an Event.
        message: String,
        /// The cloud API's error code (e.g. `TargetGroupNotFound`), when there is one: code
        /// decides on it, never on the message text.
        code: Option<String>,
        /// The underlying error.
        #[source]
        source: Option<ErrorSource>,
    },
    /// The Service asks for something this provider cannot do (bad annotation, address outside
    /// every pool, unsupported protocol). Reported as a Warning Event; not retried until the
    /// Service changes.
    #[error("{message}")]
    Permanent {
        /// What is wrong with the Service, for its Warning Event.
        message: String,
        /// The cloud API's error code when the cloud refused the request, or the provider's
        /// own refusal code (e.g. AWS's `HealthCheckPortNotOwned`).
        code: Option<String>,
        /// The underlying error.
        #[source]
        source: Option<ErrorSource>,
    },
    /// The cloud API throttled us; retry no sooner than `retry_after` if given.
    #[error("throttled: {message}")]
    Throttled {
        /// What the API said.
        message: String,
        /// The cloud API's error code.
        code: Option<String>,
        /// The earliest sensible retry, if the provider knows it.
        retry_after: Option<Duration>,
        /// The underlying error.
        #[source]
        source: Option<ErrorSource>,
    },
}

impl ProviderError {
    /// A transient failure described by `message`.
    pub fn retryable(message: impl Into<String>) -> Self {
        ProviderError::Retryable {
            message: message.into(),
            code: None,
            source: None,
        }
    }

    /// A failure that only a change of the Service can mend.
    pub fn permanent(message: impl Into<String>) -> Self {
        ProviderError::Permanent {
            message: message.into(),
            code: None,
            source: None,
        }
    }

    /// This error with the cloud API's error code.
    pub fn with_code(mut self, c: impl Into<String>) -> Self {
        match &mut self {
            ProviderError::Retryable { code, .. }
            | ProviderError::Permanent { code, .. }
            | ProviderError::Throttled { code, .. } => *code = Some(c.into()),
        }
        self
    }

    /// This error caused by `e`.
    pub fn with_source(mut self, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        match &mut self {
            ProviderError::Retryable { source, .. }
            | ProviderError::Permanent { source, .. }
            | ProviderError::Throttled { source, .. } => *source = Some(Arc::new(e)),
        }
        self
    }

    /// The cloud API's error code, if any.
    pub fn code(&self) -> Option<&str> {
        match self {
            ProviderError::Retryable { code, .. }
            | ProviderError::Permanent { code, .. }
            | ProviderError::Throttled { code, .. } => code.as_deref(),
        }
    }

    /// Whether the cloud API answered with this error code.
    pub fn has_code(&self, c: &str) -> bool {
        self.code() == Some(c)
    }

    /// A short, bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ProviderError::Retryable { .. } => "provider_retryable",
            ProviderError::Permanent { .. } => "provider_permanent",
            ProviderError::Throttled { .. } => "provider_throttled",
        }
    }

    /// True for errors that must not be retried until the Service changes.
    pub fn is_permanent(&self) -> bool {
        matches!(self, ProviderError::Permanent { .. })
    }

    /// The earliest sensible retry the cloud asked for, if it was a throttle with a hint.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The code of a [`ProviderError::Retryable`] that only another Service's release can mend (no
/// free address left in a pool): the controller then retries the Service as soon as another
/// Service's load balancer is deleted, not only when its backoff (up to 300 s) comes due.
pub const CAPACITY_EXHAUSTED: &str = "CapacityExhausted";

/// A load-balancer implementation chosen at run time by `--cloud-provider`.
///
/// All methods take the cluster name (`--cluster-name`) so a provider can namespace and tag what
/// it creates, and the Service as last seen by the controller's cache.
#[async_trait]
pub trait LoadBalancerProvider: Send + Sync {
    /// The provider's name as given to `--cloud-provider` (for logs and metrics).
    fn provider_name(&self) -> &'static str;

    /// Dry run: from now on, record each mutating cloud call in `dry` instead of making it
    /// (reads still happen). Providers that write only API objects (through the controller's
    /// client, already a dry run then) need nothing.
    fn set_dry_run(&self, dry: scm_runtime::client::dry_run::DryRun) {
        let _ = dry;
    }

    /// The load balancer's name for this Service: deterministic (same cluster and Service, same
    /// name across restarts and replicas) and valid for the cloud. Must not call the network.
    fn load_balancer_name(&self, cluster: &str, service: &Service) -> String;

    /// The status of the Service's load balancer if it exists (`None` if it does not).
    async fn get(
        &self,
        cluster: &str,
        service: &Service,
    ) -> Result<Option<LoadBalancerStatus>, ProviderError>;

    /// Creates the load balancer or brings an existing one to the desired state for `service`
    /// and `nodes`, and returns the status to publish. Must mutate nothing that already matches.
    async fn ensure(
        &self,
        cluster: &str,
        service: &Service,
        nodes: &[Node],
    ) -> Result<LoadBalancerStatus, ProviderError>;

    /// Points the existing load balancer at `nodes` (called when only the node set changed).
    /// A missing load balancer is not an error: the next `ensure` creates it.
    async fn update_hosts(
        &self,
        cluster: &str,
        service: &Service,
        nodes: &[Node],
    ) -> Result<(), ProviderError>;

    /// Deletes the Service's load balancer and everything created for it; succeeds if nothing
    /// is left (including when nothing existed).
    async fn ensure_deleted(&self, cluster: &str, service: &Service) -> Result<(), ProviderError>;

    /// True if another controller implements this Service's load balancer although its class
    /// is ours (upstream's `ImplementedElsewhere`; e.g. AWS's `aws-load-balancer-type:
    /// external`, which belongs to the AWS Load Balancer Controller). The controller then
    /// leaves the Service alone (cleaning up only if it still carries our finalizer). Must not
    /// call the network. The default is false.
    fn implemented_elsewhere(&self, _service: &Service) -> bool {
        false
    }

    /// For each Service, whether its load balancer exists: the periodic pass's existence check
    /// for every Service we remember, so a load balancer deleted out of band is recreated. May
    /// be answered more cheaply than one [`LoadBalancerProvider::get`] each (AWS: one paged
    /// DescribeLoadBalancers for all); the default asks `get` one at a time.
    async fn exist(&self, cluster: &str, services: &[Service]) -> Result<Vec<bool>, ProviderError> {
        let mut out = Vec::with_capacity(services.len());
        for s in services {
            out.push(self.get(cluster, s).await?.is_some());
        }
        Ok(out)
    }

    /// The provider-specific annotations on the Service that this provider does not implement
    /// (e.g. AWS's `service.beta.kubernetes.io/aws-load-balancer-*` ones we lack): the
    /// controller warns once per Service and set instead of ignoring them silently. Must not
    /// call the network. The default is none.
    fn unsupported_annotations(&self, _service: &Service) -> BTreeSet<String> {
        BTreeSet::new()
    }

    /// True if `status` is one this provider would publish for the Service (e.g. the DNS name
    /// of a load balancer named as ours, or addresses from our pools). Decides, when our
    /// load balancer is not found, whether a Service's status was ours (deleted out of band:
    /// recreate) or another controller's (leave it alone). Must not call the network. The
    /// default is false: an unexplained status is someone else's.
    fn recognises(&self, _cluster: &str, _service: &Service, _status: &LoadBalancerStatus) -> bool {
        false
    }

    /// Every load balancer and target group tagged for `cluster` whose name the provider could
    /// have given (the inventory sweep's listing; see [`crate::inventory`]). `None`: the
    /// provider keeps nothing in a cloud to sweep (the default; the local pools live in
    /// memory and are rebuilt from the Services).
    async fn inventory(&self, _cluster: &str) -> Result<Option<Inventory>, ProviderError> {
        Ok(None)
    }

    /// The names of every resource the provider may have made for `service` (its load balancer
    /// and, in AWS, each port's target groups): the inventory sweep keeps a served Service's
    /// resources only under these names. Must not call the network. The default is the load
    /// balancer's name.
    fn resource_names(&self, cluster: &str, service: &Service) -> BTreeSet<String> {
        [self.load_balancer_name(cluster, service)].into()
    }

    /// Deletes one orphan the inventory sweep found (a load balancer after revoking its
    /// security-group rules; a target group); succeeds if it is already gone. The default
    /// refuses: a provider without an inventory has no orphans.
    async fn delete_orphan(&self, _cluster: &str, orphan: &Orphan) -> Result<(), ProviderError> {
        Err(ProviderError::permanent(format!(
            "provider {} cannot delete {}",
            self.provider_name(),
            orphan.arn
        )))
    }

    /// Called once after the caches have synced and before any other call, with every Service
    /// the controller serves, so a stateful provider can rebuild its state (the local pool
    /// re-reserves published addresses). The default does nothing.
    async fn restore(&self, _cluster: &str, _services: &[Service]) -> Result<(), ProviderError> {
        Ok(())
    }

    /// Called once when the controller starts, on every replica, with its context: a provider
    /// configured by objects in the cluster (the local pools) starts watching them here. Must
    /// not block. The default does nothing.
    fn start(&self, _ctx: &ControllerContext, _config: &CloudLbConfig) {}

    /// Raised when capacity may have appeared without a deletion of ours (the local provider:
    /// a pool created or edited): the controller then retries every Service refused with
    /// [`CAPACITY_EXHAUSTED`] at once. The default is none.
    fn capacity_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }
}

/// Which provider `--cloud-provider` selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderKind {
    /// AWS Network Load Balancers (`aws`).
    Aws,
    /// Addresses from local pools (`local`).
    Local,
}

impl std::str::FromStr for ProviderKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "aws" => Ok(ProviderKind::Aws),
            "local" => Ok(ProviderKind::Local),
            other => Err(format!(
                "unknown cloud provider {other:?} (expected aws or local)"
            )),
        }
    }
}

//! EndpointSlice, EndpointSlice mirroring and legacy Endpoints controllers.
//!
//! Each is a pure core (`slices`, `mirror_core`, `endpoints_core`: observed state in, plan of
//! writes out) and a thin kube shell that subscribes to the process's shared informers
//! (`ctx.informers`), keeps its own index, queues keys and applies plans while this process
//! leads. What the shells share lives once: `shell` (selector, queue, sync gate, the Pod
//! informer), `cache` (the Service/Pod index) and `slice_store` (our slices and the
//! generation tracker), `writer` (every EndpointSlice write).

pub mod cache;
pub mod common;
pub mod controller;
pub mod endpoints;
pub mod endpoints_core;
pub mod metrics;
pub mod mirror_core;
pub mod mirroring;
pub mod pod;
pub mod shell;
pub mod slice_record;
pub mod slice_store;
pub mod slices;
pub mod topology;
pub mod writer;

pub use controller::{EndpointSliceConfig, run};
pub use endpoints::{EndpointsConfig, run as run_endpoints};
pub use mirroring::{MirroringConfig, run as run_mirroring};
pub use shell::ShellConfig;

/// Errors of the three controllers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("kube: {0}")]
    Kube(#[from] kube::Error),
    /// Our cache shows an older state than our own last write; retried shortly.
    #[error("EndpointSlice cache is out of date for {0}")]
    StaleCache(String),
    /// Some selected pods are on nodes we do not know; upstream retries the same way.
    #[error("node not found for {0}")]
    NodeNotFound(String),
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl scm_runtime::ReconcileError for Error {
    fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::StaleCache(_) => "stale_cache",
            Error::NodeNotFound(_) => "node_not_found",
            Error::Config(_) => "config",
        }
    }
}

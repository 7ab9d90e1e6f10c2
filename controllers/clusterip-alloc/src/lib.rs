//! ClusterIP allocation with kube-apiserver's semantics, as a controller: mirrors and guards
//! the addresses a stock API server assigned (reporting what upstream's repair loop reports),
//! assigns addresses where a non-allocating API server left them empty, and runs the
//! ServiceCIDR controller (finalizer, Ready condition, deletion blocking).

pub mod cidr_shell;
pub mod core;
pub mod servicecidr;
pub mod shell;

pub use cidr_shell::{CidrError, ServiceCidrConfig};
pub use shell::{ClusterIpAllocConfig, Error, run};

/// Runs the `service-cidr` controller until `ctx.shutdown` is cancelled.
pub async fn run_service_cidr(
    ctx: scm_runtime::ControllerContext,
    config: ServiceCidrConfig,
) -> Result<(), CidrError> {
    cidr_shell::run(ctx, config).await
}

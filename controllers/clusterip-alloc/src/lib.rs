//! ClusterIP allocation with kube-apiserver's semantics, as a controller: mirrors and guards
//! the addresses a stock API server assigned (reporting what upstream's repair loop reports),
//! assigns addresses where a non-allocating API server left them empty, and runs the
//! ServiceCIDR controller (finalizer, Ready condition, deletion blocking).
//!
//! Layout: [`core`] is pure (ranges, findings, the ledger built from all Services, the assign
//! plan); [`shell`] only implements [`scm_allocator::shell::Allocator`], the allocator shell
//! shared with `nodeport-alloc`; [`servicecidr`] and [`cidr_shell`] are the ServiceCIDR
//! controller. Both shells read the process's shared informers; neither opens a watch.
//!
//! Where we deliberately differ from kube-apiserver's repair loops:
//! - The state is rebuilt from Services, never stored, so there is no leak detection and no
//!   `ClusterIPNotAllocated` ("repair") finding: nothing can be out of sync with a snapshot.
//! - A contested address belongs to the oldest Service (creation time, then key); upstream
//!   goes by list order, which could move ownership after a restart.
//! - An unparsable address is quoted as written (upstream prints `<nil>`).
//! - ServiceCIDRs larger than 2^20 addresses: the first 2^20 are tracked and used for picks;
//!   addresses beyond are valid, counted, and checked for duplicates, but never picked.
//! - Refusals on the assign path (upstream returns them to the client) become Warning Events
//!   `ClusterIPAllocationFailed` with upstream's message, or `ServiceCIDRFull`.
//! - Events and repair counters come from the leader only; gauges from every replica.
//! - The first usable address of the primary range is held for `default/kubernetes` even
//!   before that Service exists, as kube-apiserver's bootstrap controller would take it.

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

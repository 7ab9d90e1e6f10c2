//! ClusterIP allocation with kube-apiserver's semantics, as a controller: mirrors and guards
//! the addresses a stock API server assigned (reporting what upstream's repair loops report),
//! with `--assign` only ([`ClusterIpAllocConfig::assign`]) assigns addresses where a
//! non-allocating API server left them empty, and runs the ServiceCIDR controller (finalizer,
//! Ready condition, deletion blocking, and upstream's `KubernetesServiceCIDRError` Event).
//!
//! Layout: [`core`] is pure (ranges, findings, the ledger built from all Services and the
//! IPAddress objects, the assign plan); [`shell`] only implements
//! [`scm_allocator::shell::Allocator`], the allocator shell shared with `nodeport-alloc`;
//! [`servicecidr`] and [`cidr_shell`] are the ServiceCIDR controller. Both shells read the
//! process's shared informers (Services, ServiceCIDRs, IPAddresses); neither opens a watch.
//!
//! **IPAddress objects.** Since v1.33 (the only allocator from v1.34) kube-apiserver keeps its
//! ClusterIP state as `networking.k8s.io/v1` IPAddress objects, and its repair loop
//! (`repairip.go`) compares them with the Services. Where the API server has them (at least one
//! managed by `ipallocator.k8s.io`), we report the same findings with the same reasons and
//! messages ([`core::ipaddr`]): `ClusterIPNotAllocated` on a Service, `IPAddressNotAllocated`
//! and `IPAddressWrongReference` on the IPAddress (in the `default` namespace, as Events of
//! cluster-scoped objects go), with upstream's waiting periods; the capacity gauges count the
//! allocator's IPAddresses per CIDR as kube-apiserver's do. **We never create, change or delete
//! an IPAddress**: the API server's repair loop owns them and acts on the same findings (its
//! messages say "repairing" and "cleaning up" because it does). Elsewhere (an API server that
//! does not serve or fill them) the Services are the state, as before.
//!
//! Ranges of any size are tracked as the set of used addresses ([`scm_allocator::SparseRange`]),
//! so a `10.0.0.0/8` or an IPv6 `/64` costs what its Services cost. The flag takes what
//! kube-apiserver v1.37 takes: any IPv4 range, IPv6 `/64` or longer.
//!
//! Where we deliberately differ from kube-apiserver's repair loops:
//! - We only report; upstream's IPAddress loop repairs (creates, recreates or deletes
//!   IPAddresses). Its findings are counted in `apiserver_clusterip_repair_ip_errors_total`
//!   under the bitmap loop's types (`repair` for a ClusterIP without its IPAddress, `leak` for
//!   an IPAddress no Service accounts for); upstream's IPAddress loop counts nothing.
//! - A finding comparing IPAddresses with Services must stand for 1 s before it is reported:
//!   our two watches can be a moment apart (upstream's loop runs on the API server's own
//!   events and needs no such wait).
//! - Without IPAddress objects (the bitmap path) the state is rebuilt from Services, never
//!   stored, so there is no leak detection there and no "repair" finding.
//! - A contested address belongs to the Service its IPAddress names; without one, to the
//!   oldest Service (creation time, then key); upstream's bitmap loop goes by list order, which
//!   could move ownership after a restart.
//! - An unparsable address is quoted as written (upstream prints `<nil>`).
//! - Refusals on the assign path (upstream returns them to the client) become Warning Events
//!   `ClusterIPAllocationFailed` with upstream's message, or `ServiceCIDRFull` (only on the
//!   bitmap path: where the API server keeps IPAddresses a full range is the create's error,
//!   so it is `ClusterIPAllocationFailed` too).
//! - Events and repair counters come from the leader only; gauges from every replica.
//! - A finding about a Service's ClusterIP is also kept as the Service's [`CLUSTER_IP_VALID`]
//!   condition (`False`, the Event's reason and message) until it goes; upstream has no such
//!   condition (issue 15).
//! - The first usable address of the primary range is held for `default/kubernetes` even
//!   before that Service exists, as kube-apiserver's bootstrap controller would take it.

pub mod cidr_shell;
pub mod core;
pub mod servicecidr;
pub mod shell;

pub use cidr_shell::{CidrError, ServiceCidrConfig};

/// The condition `clusterip-alloc` keeps on a Service while a repair finding about its
/// ClusterIP stands (`False`, reason = the finding's Event reason); a healthy Service has none.
pub const CLUSTER_IP_VALID: &str = "ClusterIPValid";
pub use shell::{ClusterIpAllocConfig, Error, run};

/// Runs the `service-cidr` controller until `ctx.shutdown` is cancelled.
pub async fn run_service_cidr(
    ctx: scm_runtime::ControllerContext,
    config: ServiceCidrConfig,
) -> Result<(), CidrError> {
    cidr_shell::run(ctx, config).await
}

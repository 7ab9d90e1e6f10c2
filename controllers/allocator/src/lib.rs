//! A pure bitmap allocator with kube-apiserver's allocation semantics, shared by the ClusterIP
//! and NodePort allocators and the cloud load-balancer address pool, with the ownership ledger
//! and the one kube shell of the two Service allocators. No Kubernetes types outside [`shell`].
//!
//! - [`Bitmap`]: indices `[0, size)` with a static lower band (KEP-3070 for ClusterIPs, KEP-3668
//!   for NodePorts). Dynamic picks start at a random index inside the upper band and scan
//!   linearly with wrap-around; only when the upper band is full do they scan the static band
//!   the same way. Requested indices may be anywhere.
//! - [`IpRange`]: a CIDR view over a bitmap (network address and IPv4 broadcast never
//!   allocated; the bitmap era's size limits, IPv4 /12 and IPv6 /108, in [`IpRange::new`];
//!   larger CIDRs are tracked up to 2^20 addresses). cloud-lb's address pools use it.
//! - [`PortRange`]: a port span view, with [`PortSpan`] parsing `--service-node-port-range`.
//! - [`SparseRange`]: a ClusterIP range of any size (`10.0.0.0/8`, an IPv6 `/64`) with the same
//!   picking rules, whose state is the set of used addresses: memory follows the Services,
//!   not the range.
//!
//! - [`Mirror`]: the ownership ledger over a [`Pool`] (who holds each value, oldest wins,
//!   pending writes claimed first, findings, who needs an assignment).
//! - [`shell`]: the one kube shell of the ClusterIP and NodePort allocators, over the
//!   [`shell::Allocator`] trait their cores implement. The only module with Kubernetes types.
//!
//! For another pool (e.g. load-balancer addresses) build an [`IpRange`] with
//! [`IpRange::new_capped`] or a [`Bitmap`] with the band that pool wants (0 for none).
//! Randomness is passed in, so callers pick `rand::rng()` in production and a seeded RNG in
//! tests.

pub mod bitmap;
pub mod ip;
pub mod mirror;
pub mod port;
pub mod shell;
pub mod sparse;

pub use bitmap::{Band, Bitmap, BitmapError, Snapshot};
pub use ip::{IpError, IpFamily, IpRange, MAX_TRACKED, Placement, clusterip_static_band};
pub use mirror::{Mirror, Pending, Pool, Report};
pub use port::{PortError, PortRange, PortSpan, PortSpanError, nodeport_static_band};
pub use sparse::SparseRange;

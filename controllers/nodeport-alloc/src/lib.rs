//! NodePort and health-check node port allocation with kube-apiserver's semantics, as a
//! controller: mirrors and guards what a stock API server assigned (reporting what upstream's
//! repair loop reports), and, only with `--assign` ([`NodePortAllocConfig::assign`]), assigns
//! ports where a non-allocating API server left them empty.
//!
//! Deliberate differences from upstream: the state is rebuilt from Services (no leak or
//! "repair" findings), contested ports belong to the oldest Service, refusals of requested
//! ports become `NodePortAllocationFailed` Warning Events with upstream's message, and Events
//! and repair counters come from the leader only.
//!
//! Layout: [`core`] is pure (findings, the ledger over the port range, the assign plan);
//! [`shell`] only implements [`scm_allocator::shell::Allocator`], the allocator shell shared
//! with `clusterip-alloc`, which reads the process's shared Service informer.

pub mod core;
pub mod shell;

pub use shell::{Error, NodePortAllocConfig, run};

//! ClusterIP allocation with kube-apiserver's semantics, as a controller: mirrors and guards
//! the addresses a stock API server assigned (reporting what upstream's repair loop reports),
//! assigns addresses where a non-allocating API server left them empty, and runs the
//! ServiceCIDR controller (finalizer, Ready condition, deletion blocking).

pub mod core;
pub mod servicecidr;

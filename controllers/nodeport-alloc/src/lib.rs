//! NodePort and health-check node port allocation with kube-apiserver's semantics, as a
//! controller: mirrors and guards what a stock API server assigned (reporting what upstream's
//! repair loop reports), and assigns ports where a non-allocating API server left them empty.

pub mod core;
pub mod shell;

pub use shell::{Error, NodePortAllocConfig, run};

//! EndpointSlice, EndpointSlice mirroring and legacy Endpoints controllers.
//!
//! Each is a pure core (`slices`, `mirror_core`, `endpoints_core`: observed state in, plan of
//! writes out) and a thin kube shell that keeps trimmed caches, queues Service keys and applies
//! plans while this process leads.

pub mod common;
pub mod endpoints_core;
pub mod mirror_core;
pub mod slices;
pub mod topology;

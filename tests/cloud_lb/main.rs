//! The cloud-lb controller against the real local control plane and moto's real server on
//! loopback (installed by tests/moto/install.sh). Faults are scripted only by the thin layer in
//! front of moto (`test_support::moto::FaultProxy`); moto does everything it can do itself.
//!
//! Nodes are cluster-scoped and the control plane is shared, so the tests in this binary run
//! one at a time (a global lock, [`harness::SERIAL`]) and each starts from no nodes.
//!
//! Modules by topic: [`elbv2`] (load balancers, listeners, target groups, targets),
//! [`ec2`] (security-group rules, subnets), [`lifecycle`] (class filtering, crashes, errors,
//! foreign resources), [`local_pools`] (the local provider), [`binary`] (the manager binary's
//! wiring); [`harness`] and [`aws`] hold what they share.

mod adopt;
mod aws;
mod backoff;
mod batches;
mod binary;
mod conditions;
mod drain;
mod ec2;
mod elbv2;
mod harness;
mod inventory;
mod lifecycle;
mod local_pools;
mod parity;
mod pool_objects;
mod quota;
mod repair;
mod sharing;
mod tenant;
mod throttle;
